"""Driving tensor-parallel instances across a `DistGroup`: world rank = instance * tp + tp_rank.

`TPCluster(group, model, kv_slots, tp_size)` builds one `InstanceWorker` per rank (its TP
shard, its instance's TP process group, a P2P endpoint on its ESP plane) and runs plans on
all ranks like `ESPCluster`. Every TP rank of an instance samples; `execute` returns TP rank
0's tokens after checking that the other TP ranks sampled exactly the same ones.
"""

from __future__ import annotations

import torch

from esp_core.sched.plan import IterationPlan, SampledToken


def _workers(ctx) -> dict:
    return ctx.state.setdefault("tp_workers", {})


def rank_init_tp(ctx, key: tuple) -> int:
    """Build (once) this rank's TP worker for key = (model, kv_slots, tp_size, dtype)."""
    from esp_core.runtime.comm import P2PComm, RankLayout
    from esp_core.runtime.config import WorkerConfig
    from esp_core.runtime.tensor_parallel import init_tp_groups
    from esp_core.runtime.worker import InstanceWorker

    model, kv_slots, tp_size, dtype = key
    workers = _workers(ctx)
    if key not in workers:
        layout = RankLayout(ctx.world_size // tp_size, tp_size)
        tp = init_tp_groups(layout, timeout_s=ctx.timeout_s)
        instance, _ = layout.instance_of(ctx.rank)
        config = WorkerConfig(
            model=model, kv_slots=kv_slots, dtype=dtype, num_threads=torch.get_num_threads()
        )
        w = InstanceWorker(config, instance, layout.num_instances, tp)
        w.comm = P2PComm.from_world(tp_size=tp_size, timeout_s=ctx.timeout_s)
        workers[key] = w
    return workers[key].kv_free_slots()


def rank_execute_tp(ctx, key: tuple, plan: IterationPlan):
    """(instance, tp_rank, [(batch_id, error, sampled)]) of this rank."""
    w = _workers(ctx)[key]
    results = w.execute(plan)
    return w.rank, w.tp.rank, [(r.batch_id, r.error, r.sampled) for r in results]


def rank_local_shapes(ctx, key: tuple) -> dict[str, tuple]:
    """Shapes this rank holds: layer 0's fused QKV, O, gate/up, down, embedding and KV pool."""
    w = _workers(ctx)[key]
    lw = w.model.layers[0]
    return {
        "w_qkv": tuple(lw.w_qkv.shape),
        "w_o": tuple(lw.w_o.shape),
        "w_gate_up": tuple(lw.w_gate_up.shape),
        "w_down": tuple(lw.w_down.shape),
        "embed": tuple(w.model.embed_tokens.shape),
        "kv_pool": tuple(w.pool.kv.shape),
    }


def rank_pool_state_tp(ctx, key: tuple):
    w = _workers(ctx)[key]
    w.pool.check_invariants()
    return w.kv_free_slots(), w.kv_total_slots(), sorted(w.pool.requests()), sorted(w.states)


def rank_reset_tp(ctx, key: tuple) -> None:
    w = _workers(ctx)[key]
    for rid in w.pool.requests():
        w.pool.free(rid)
    w.states.clear()


def _same(a: SampledToken, b: SampledToken) -> bool:
    return a.token_id == b.token_id and [(t.token_id, t.logprob) for t in a.top_logprobs] == [
        (t.token_id, t.logprob) for t in b.top_logprobs
    ]


class TPCluster:
    """TP workers for one model on every rank of a DistGroup (world / tp_size instances)."""

    def __init__(self, group, model: str, kv_slots: int, tp_size: int, dtype: str = "float32") -> None:
        self.group = group
        self.key = (model, kv_slots, tp_size, dtype)
        self.group.run(rank_init_tp, self.key, timeout_s=120)

    def execute(self, plan: IterationPlan, timeout_s: float = 300.0) -> dict[str, SampledToken]:
        """Run `plan` on every rank; TP rank 0's sampled tokens (each request sampled by one
        instance), after checking every TP rank of that instance sampled the same."""
        by_rank: dict[tuple[int, int], dict[str, SampledToken]] = {}
        for inst, tp_rank, results in self.group.run(rank_execute_tp, self.key, plan, timeout_s=timeout_s):
            got = by_rank.setdefault((inst, tp_rank), {})
            for batch_id, error, sampled in results:
                if error:
                    raise RuntimeError(f"instance {inst} TP rank {tp_rank}, batch {batch_id}: {error}")
                got.update({t.request_id: t for t in sampled})
        out: dict[str, SampledToken] = {}
        for (inst, tp_rank), got in sorted(by_rank.items()):
            lead = by_rank[(inst, 0)]
            assert set(got) == set(lead), f"instance {inst}: TP ranks sampled different requests"
            for rid, tok in got.items():
                assert _same(tok, lead[rid]), f"instance {inst} TP rank {tp_rank} differs on {rid}"
                if tp_rank == 0:
                    assert rid not in out, f"{rid} sampled twice"
                    out[rid] = tok
        return out

    def local_shapes(self) -> list[dict[str, tuple]]:
        return self.group.run(rank_local_shapes, self.key)

    def pool_states(self):
        return self.group.run(rank_pool_state_tp, self.key)

    def reset(self) -> None:
        self.group.run(rank_reset_tp, self.key)
