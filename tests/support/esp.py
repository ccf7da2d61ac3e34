"""Driving real `InstanceWorker`s across a `DistGroup` with hand-built ESP plans (tests and
benchmarks; the scheduler builds real plans).

* `save_tiny_model(dir, num_kv_heads=...)`: a tiny random Llama checkpoint (MHA/GQA/MQA)
  with peaked logits (architecture.md §6), loadable by the runtime's HF loader.
* plan factories: `even_keep` (contiguous split of a range over instances), `prefill_batch`,
  `decode_item`.
* `ESPCluster`: one worker per rank of a DistGroup; `execute(plan)` runs a plan on every
  rank (each executes the part naming it) and returns the union of sampled tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from esp_core.runtime.builtin import builtin_arch
from esp_core.runtime.config import ModelArch
from esp_core.runtime.model import hf_weight_names
from esp_core.sched.plan import (
    DecodeItem,
    IterationPlan,
    KVKeep,
    PrefillBatch,
    PrefillItem,
    SampledToken,
    TokenRange,
)

_ids = itertools.count(1000)


def next_id() -> int:
    return next(_ids)


def tiny_arch(
    num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, hidden_size: int = 64, num_layers: int = 2
) -> ModelArch:
    return dataclasses.replace(
        builtin_arch(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def save_tiny_model(directory: str | Path, seed: int = 0, **arch_kwargs) -> Path:
    """A random checkpoint whose logits are peaked (LM head std ~ 4 / sqrt(hidden))."""
    from safetensors.torch import save_file

    arch = tiny_arch(**arch_kwargs)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(hf_weight_names(arch).items()):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = (4.0 / math.sqrt(arch.hidden_size)) * torch.randn(shape, generator=gen)
        else:
            t = (0.8 / math.sqrt(shape[1])) * torch.randn(shape, generator=gen)
        tensors[name] = t.contiguous()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------ plans
def even_keep(start: int, end: int, instances: Sequence[int]) -> tuple[KVKeep, ...]:
    """Split [start, end) into contiguous, near-equal ranges, one per instance (an
    instance may get an empty share when the range is short: it is then omitted)."""
    n = len(instances)
    bounds = [start + (end - start) * j // n for j in range(n + 1)]
    return tuple(
        KVKeep(inst, (TokenRange(bounds[j], bounds[j + 1]),))
        for j, inst in enumerate(instances)
        if bounds[j + 1] > bounds[j]
    )


def prefill_item(
    request_id: str,
    start: int,
    end: int,
    offset: int,
    keep: Sequence[KVKeep],
    cached_holders: Sequence[int] = (),
    sample: bool = True,
    extra_token_ids: Sequence[int] = (),
) -> PrefillItem:
    return PrefillItem(
        request_id,
        TokenRange(start, end),
        offset,
        tuple(keep),
        tuple(cached_holders),
        sample,
        tuple(extra_token_ids),
    )


def prefill_batch(ring: Sequence[int], items: Sequence[PrefillItem]) -> PrefillBatch:
    return PrefillBatch(next_id(), tuple(ring), tuple(items))


def decode_item(
    request_id: str,
    input_token: int,
    position: int,
    master: int,
    holders: Sequence[int],
    new_kv_instance: int,
    output_prefix: Sequence[int] = (),
) -> DecodeItem:
    return DecodeItem(
        request_id,
        input_token,
        position,
        master,
        tuple(sorted(set(holders))),
        new_kv_instance,
        tuple(output_prefix),
    )


# ------------------------------------------------------------------------------ ranks
def _worker(ctx, key: tuple):
    return ctx.state["workers"][key]


def rank_init(ctx, key: tuple) -> int:
    """Build (once) this rank's InstanceWorker for key = (model, kv_slots, dtype, rope
    scaling items or None); returns its free slots."""
    from esp_core.runtime.config import WorkerConfig
    from esp_core.runtime.worker import InstanceWorker

    model, kv_slots, dtype, rope_items = key
    workers = ctx.state.setdefault("workers", {})
    if key not in workers:
        config = WorkerConfig(
            model=model,
            kv_slots=kv_slots,
            dtype=dtype,
            num_threads=torch.get_num_threads(),
            rope_scaling=None if rope_items is None else dict(rope_items),
        )
        w = InstanceWorker(config, ctx.rank, ctx.world_size)
        w.attach_world(ctx.timeout_s)
        workers[key] = w
    return workers[key].kv_free_slots()


def rank_execute(ctx, key: tuple, plan: IterationPlan):
    """Execute a plan on this rank; returns [(batch_id, error, sampled, elapsed_s)]."""
    results = _worker(ctx, key).execute(plan)
    return [(r.batch_id, r.error, r.sampled, r.elapsed_s) for r in results]


def rank_execute_own_part(ctx, key: tuple, plan: IterationPlan):
    """`rank_execute` of the part of `plan` naming this rank, narrowed as the controller
    does (app/dispatch.py: sub_plan): a scheduler's plan exactly as decided."""
    from esp_serve.app.dispatch import sub_plan

    part = sub_plan(plan, ctx.rank)
    return [] if part is None else rank_execute(ctx, key, part)


def rank_pool_state(ctx, key: tuple):
    """(free slots, total slots, requests holding slots, requests with state)."""
    w = _worker(ctx, key)
    w.pool.check_invariants()
    return w.kv_free_slots(), w.kv_total_slots(), sorted(w.pool.requests()), sorted(w.states)


def rank_reset(ctx, key: tuple) -> None:
    """Forget every request and free every slot (after a failed test, so it cannot leak
    into the next one)."""
    w = _worker(ctx, key)
    for rid in w.pool.requests():
        w.pool.free(rid)
    w.states.clear()


def rank_comm_stats(ctx, key: tuple, reset: bool = False):
    w = _worker(ctx, key)
    stats = dataclasses.asdict(w.comm.stats)
    if reset:
        w.comm.stats.reset()
    return stats


def rank_cascade_stats(ctx, key: tuple) -> dict[str, int]:
    """This rank's shared-prefix attention counters (kernels/cascade.py `STATS`)."""
    from esp_serve.kernels.cascade import STATS

    return dict(STATS)


class ESPCluster:
    """Workers for one model on every rank of a DistGroup."""

    def __init__(
        self, group, model: str, kv_slots: int, dtype: str = "float32", rope_scaling: dict | None = None
    ) -> None:
        self.group = group
        self.model = model
        self.kv_slots = kv_slots
        self.dtype = dtype
        rope_items = None if rope_scaling is None else tuple(sorted(rope_scaling.items()))
        self.key = (model, kv_slots, dtype, rope_items)  # hashable: the ranks' worker cache key
        self.init()

    def init(self) -> None:
        self.group.run(rank_init, self.key, timeout_s=120)

    def execute(self, plan: IterationPlan, timeout_s: float = 120.0) -> dict[str, SampledToken]:
        """Run `plan` on every rank; raise if a batch reported an error; return the union
        of sampled tokens (each request is sampled by exactly one instance)."""
        self.init()  # no-op unless the group was restarted after a failure
        out: dict[str, SampledToken] = {}
        for rank, results in enumerate(self.group.run(rank_execute, self.key, plan, timeout_s=timeout_s)):
            for batch_id, error, sampled, _ in results:
                if error:
                    raise RuntimeError(f"rank {rank}, batch {batch_id}: {error}")
                for tok in sampled:
                    if tok.request_id in out:
                        raise AssertionError(f"{tok.request_id} sampled twice")
                    out[tok.request_id] = tok
        return out

    def execute_batches(self, plan: IterationPlan, timeout_s: float = 120.0, narrowed: bool = False):
        """Run `plan`; one merged BatchResult per batch (sampled tokens of all its
        instances, slowest elapsed), as the controller would report them. `narrowed`:
        each rank gets only its part, as the controller sends it (a scheduler's plan;
        hand-built plans without joins go whole to every rank)."""
        from esp_core.sched.plan import BatchResult, PrefillBatch

        self.init()
        per_batch: dict[int, list] = {}
        fn = rank_execute_own_part if narrowed else rank_execute
        for results in self.group.run(fn, self.key, plan, timeout_s=timeout_s):
            for batch_id, error, sampled, elapsed in results:
                per_batch.setdefault(batch_id, []).append((error, sampled, elapsed))
        out = []
        for batch in plan.batches():
            parts = per_batch.get(batch.batch_id, [])
            errors = [e for e, _, _ in parts if e]
            out.append(
                BatchResult(
                    batch.batch_id,
                    "prefill" if isinstance(batch, PrefillBatch) else "decode",
                    tuple(batch.instances),
                    tuple(t for _, s, _ in parts for t in s),
                    max((el for _, _, el in parts), default=0.0),
                    errors[0] if errors else None,
                )
            )
        return out

    def timed(self, plan: IterationPlan, timeout_s: float = 600.0) -> list[list[tuple]]:
        """Run `plan`; per rank the raw (batch_id, error, sampled, elapsed_s) tuples."""
        return self.group.run(rank_execute, self.key, plan, timeout_s=timeout_s)

    def pool_states(self):
        return self.group.run(rank_pool_state, self.key)

    def reset(self) -> None:
        self.group.run(rank_reset, self.key)

    def cascade_stats(self) -> list[dict[str, int]]:
        return self.group.run(rank_cascade_stats, self.key)

    def comm_stats(self, reset: bool = False):
        return self.group.run(rank_comm_stats, self.key, reset)


def rank_execute_counting_reads(ctx, key: tuple, plan: IterationPlan):
    """`rank_execute`, also returning the host reads its steps made (`host_reads`)."""
    from tests.support.host_reads import host_reads

    with host_reads() as reads:
        results = rank_execute(ctx, key, plan)
    return results, dict(reads)
