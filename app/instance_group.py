"""The instances of one ESP group: one `ElasticInstance` Ray actor per placement-group
bundle 1..N (bundle 0 holds the controller), and the torch.distributed world group they
form for multi-instance batches."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from esp_serve.app.config import AppConfig
from esp_serve.app.instance import ElasticInstance

log = logging.getLogger("ray.serve")


def instance_actor_name(group_id: str, rank: int) -> str:
    """Named so that operators (and the fault-injection test) can find an instance."""
    return f"esp-instance-{group_id}-{rank}"


def start_instance(cfg: AppConfig, rank: int, group_id: str) -> Any:
    """The ElasticInstance of bundle rank+1 of the replica's placement group (or a plain
    actor with the same resources when run outside a placement group, e.g. in tools)."""
    pg = ray.util.get_current_placement_group()
    res = dict(cfg.cluster.instance_resources)
    num_cpus, num_gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
    n = cfg.cluster.num_instances
    options: dict[str, Any] = dict(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=res,
        max_restarts=0,
        name=instance_actor_name(group_id, rank),
    )
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank + 1
        )
    return ElasticInstance.options(**options).remote(cfg.worker_kwargs(), rank, n)


def start_instances(cfg: AppConfig, group_id: str) -> list[Any]:
    return [start_instance(cfg, rank, group_id) for rank in range(cfg.cluster.num_instances)]


async def join_world_group(instances: list[Any], cfg: AppConfig, group_id: str) -> None:
    """All instances join one torch.distributed world group (rendezvous on a free port
    of instance 0's node), with explicit timeouts."""
    c = cfg.cluster
    ip, port = await asyncio.wait_for(instances[0].rendezvous.remote(), 30)
    init = f"tcp://{ip}:{port}"
    await asyncio.wait_for(
        asyncio.gather(
            *(
                a.join_group.remote(init, c.comm_backend, c.group_init_timeout_s, c.comm_timeout_s)
                for a in instances
            )
        ),
        c.group_init_timeout_s + 10,
    )
    log.info(
        "ESP group %s: %d instances joined the %s world group at %s",
        group_id,
        len(instances),
        c.comm_backend,
        init,
    )
