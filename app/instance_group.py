"""The instances of one ESP group: per placement-group bundle 1..N (bundle 0 holds the
controller) one instance of `cluster.tensor_parallel_size` = t `ElasticInstance` Ray actors,
one per TP rank, all in the instance's bundle; and the torch.distributed world group they
form (world rank = instance * t + tp_rank, esp_core/runtime/comm.py `RankLayout`).

The controller keeps `ranks[i]`, the actors of instance i (TP rank order): every plan
piece goes to all of them (`execute_on_ranks`), TP rank 0 answers for the instance.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
from collections.abc import Awaitable
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from esp_serve.app.config import AppConfig
from esp_serve.app.instance import ElasticInstance
from esp_serve.app.plan_channel import PlanClient

log = logging.getLogger("ray.serve")


# glibc's malloc gives a freed block above its (adaptive) mmap threshold back to the
# kernel and trims the heap top above 128 KiB: an instance then faults in fresh pages for
# every large temporary of a step (logits of a batch over a 49K-152K vocabulary,
# activations of a prefill chunk). Keeping up to 128 MiB of freed heap and serving blocks
# under 64 MiB from it (the KV pool and weights stay mmapped) made `sample()` at 32 rows
# x 49K 2.5x faster on the 2-core VM (docs/benchmarks.md); a variable already set in the
# environment wins.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


def instance_env() -> dict[str, str]:
    """Environment variables of an instance actor's process."""
    return {k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}


def instance_actor_name(group_id: str, rank: int, tp_rank: int = 0) -> str:
    """Named so that operators (and the fault-injection test) can find an instance; TP
    rank 0 keeps the name an instance has without TP."""
    return f"esp-instance-{group_id}-{rank}" + (f"-tp{tp_rank}" if tp_rank else "")


def start_instance(cfg: AppConfig, rank: int, group_id: str) -> list[Any]:
    """The actors of instance `rank`, one per TP rank, in bundle rank+1 of the replica's
    placement group (or plain actors with the same resources when run outside a placement
    group, e.g. in tools). The bundle holds t ranks' resources (`instance_bundle`)."""
    pg = ray.util.get_current_placement_group()
    res = dict(cfg.cluster.instance_resources)
    num_cpus, num_gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
    n, tp = cfg.cluster.num_instances, cfg.cluster.tensor_parallel_size
    kwargs = cfg.worker_kwargs()
    actors = []
    for tp_rank in range(tp):
        options: dict[str, Any] = dict(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=res,
            max_restarts=0,
            name=instance_actor_name(group_id, rank, tp_rank),
            runtime_env={"env_vars": instance_env()},
        )
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank + 1
            )
        actors.append(ElasticInstance.options(**options).remote(kwargs, rank, n, tp_rank, tp))
    return actors


def start_instances(cfg: AppConfig, group_id: str) -> list[list[Any]]:
    return [start_instance(cfg, rank, group_id) for rank in range(cfg.cluster.num_instances)]


def all_actors(ranks: list[list[Any]]) -> list[Any]:
    """Every rank actor of the group, in world-rank order."""
    return [a for instance in ranks for a in instance]


def needs_world_group(cfg: AppConfig, num_instances: int) -> bool:
    """ESP across instances talks over the world group; TP all-reduces inside one do too."""
    esp = cfg.scheduler.policy != "local" and num_instances > 1
    return esp or cfg.cluster.tensor_parallel_size > 1


async def open_channels(ranks: list[Any], token: bytes, timeout_s: float) -> list[PlanClient]:
    """Connect to the plan channel of each TP rank of one instance (app/plan_channel.py)."""
    addresses = await asyncio.wait_for(
        asyncio.gather(*(a.open_plan_channel.remote(token) for a in ranks)), timeout_s
    )
    return list(await asyncio.gather(*(PlanClient.connect(tuple(a), token, timeout_s) for a in addresses)))


def execute_on_ranks(
    channels: list[PlanClient], plan_bytes: bytes, generation: int, seq: int
) -> Awaitable[bytes]:
    """Send one pickled sub-plan, the instance's `seq`-th of `generation`, to every TP
    rank of an instance (the same bytes) over their plan channels; the awaitable gives TP
    rank 0's pickled results. With TP 1 it is the channel's own future."""
    lead = channels[0].send(plan_bytes, generation, seq)
    if len(channels) == 1:
        return lead
    return lead_results(lead, [c.send(plan_bytes, generation, seq) for c in channels[1:]])


async def lead_results(lead: Any, others: list[Any]) -> bytes:
    """TP rank 0's results, awaited together with the other ranks' answers (their failed
    batches only, usually an empty list): a rank that died raises here, a batch that
    failed on any rank is reported failed."""
    answers = await asyncio.gather(lead, *others)
    failed = [r for answer in answers[1:] for r in pickle.loads(answer)]
    if not failed:
        return answers[0]
    by_batch = {r.batch_id: r for r in pickle.loads(answers[0])}
    by_batch.update((r.batch_id, r) for r in failed)
    return pickle.dumps(list(by_batch.values()), protocol=pickle.HIGHEST_PROTOCOL)


async def reset_instances(
    ranks: list[list[Any]], instances: list[int], timeout_s: float, generation: int = 0
) -> set[int]:
    """Clear every TP rank of `instances` (`ElasticInstance.reset`: sub-plans of
    generations before `generation` are refused after it); returns the instances of
    which some rank did not answer in time (to be replaced)."""
    actors = [(i, a) for i in instances for a in ranks[i]]
    answers = await asyncio.gather(
        *(asyncio.wait_for(a.reset.remote(generation), timeout_s) for _, a in actors),
        return_exceptions=True,
    )
    failed = set()
    for (i, _), answer in zip(actors, answers):
        if isinstance(answer, BaseException):
            log.error("instance %d did not reset (%r): replacing it", i, answer)
            failed.add(i)
    return failed


def replace_instance(cfg: AppConfig, ranks: list[list[Any]], instance: int, group_id: str) -> None:
    """Kill every TP rank of `instance` (some may still live after one died: they hold
    the bundle's resources) and start fresh ones in its bundle, in `ranks[instance]`."""
    for a in ranks[instance]:
        ray.kill(a)
    ranks[instance] = start_instance(cfg, instance, group_id)


async def join_world_group(ranks: list[list[Any]], cfg: AppConfig, group_id: str) -> None:
    """All rank actors join one torch.distributed world group (rendezvous on a free port
    of instance 0's node), with explicit timeouts."""
    c = cfg.cluster
    actors = all_actors(ranks)
    ip, port = await asyncio.wait_for(actors[0].rendezvous.remote(), 30)
    init = f"tcp://{ip}:{port}"
    await asyncio.wait_for(
        asyncio.gather(
            *(
                a.join_group.remote(init, c.comm_backend, c.group_init_timeout_s, c.comm_timeout_s)
                for a in actors
            )
        ),
        c.group_init_timeout_s + 10,
    )
    log.info(
        "ESP group %s: %d instances x TP %d joined the %s world group at %s",
        group_id,
        len(ranks),
        c.tensor_parallel_size,
        c.comm_backend,
        init,
    )
