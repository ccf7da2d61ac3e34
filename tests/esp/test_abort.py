"""Cross-rank abort: one rank of a 3-instance ring prefill fails before its first
transfer. Its peers are blocked on receives from it; they must fail promptly (the
failing rank gives up its group, which closes its connections), not after the transfer
timeout (here 300 s, far beyond the 90 s this test allows). Then the group is re-formed
on a fresh address, and the same prefill runs correctly: tokens equal a single-instance
run and every pool is free afterwards.

Its own process group: the abort destroys the world group, which the session's shared
group (conftest) must keep."""

from __future__ import annotations

import random

import pytest

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import (
    IterationPlan,
    NewRequest,
    Release,
    ReleaseReason,
    SamplingParams,
)
from tests.support.dist import DistGroup, free_port
from tests.support.esp import (
    ESPCluster,
    even_keep,
    next_id,
    prefill_batch,
    prefill_item,
    rank_execute,
    save_tiny_model,
)
from tests.support.runtime import generate_tokens

pytestmark = pytest.mark.slow

WORLD = 3
KV_SLOTS = 256
TRANSFER_TIMEOUT_S = 300.0  # what a blocked peer would wait without the abort
FAILING_RANK = 1


def _execute_with_fault(ctx, key, plan, failing_rank: int):
    """Run `plan`; on `failing_rank`, the ESP batch raises before any transfer."""
    from tests.support.esp import _worker

    if ctx.rank != failing_rank:
        return rank_execute(ctx, key, plan)
    worker = _worker(ctx, key)

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault before the first transfer")

    worker._run_esp = broken  # this worker object only, for this plan
    try:
        return rank_execute(ctx, key, plan)
    finally:
        del worker._run_esp


def _rejoin(ctx, key, port: int) -> bool:
    """Join a fresh world group (as the controller's recovery does) and drop all state."""
    from tests.support.esp import _worker

    worker = _worker(ctx, key)
    was_aborted = worker.comm.aborted is not None
    worker.join_world(f"tcp://127.0.0.1:{port}", "gloo", 60, TRANSFER_TIMEOUT_S)
    worker.reset()
    return was_aborted


def test_a_rank_failing_before_a_transfer_unblocks_its_peers_and_the_group_reforms(tmp_path):
    model = str(save_tiny_model(tmp_path / "m", seed=5, num_heads=4, num_kv_heads=2))
    rng = random.Random(0)
    prompt = [256] + [rng.randrange(256) for _ in range(40)]
    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ring = tuple(range(WORLD))

    def plan() -> IterationPlan:
        item = prefill_item("r", 0, len(prompt), 0, even_keep(0, len(prompt), ring))
        return IterationPlan(
            next_id(),
            new_requests=(NewRequest("r", tuple(prompt), sampling),),
            prefills=(prefill_batch(ring, [item]),),
        )

    with DistGroup(WORLD, backend="gloo", timeout_s=TRANSFER_TIMEOUT_S) as group:
        cluster = ESPCluster(group, model, KV_SLOTS)
        failed = group.run(_execute_with_fault, cluster.key, plan(), FAILING_RANK, timeout_s=90)
        errors = {rank: results[0][1] for rank, results in enumerate(failed)}
        assert "injected fault" in errors[FAILING_RANK], errors
        for rank in set(ring) - {FAILING_RANK}:  # the peers failed on the transfer
            assert errors[rank] and "CommError" in errors[rank], errors

        assert all(group.run(_rejoin, cluster.key, free_port()))  # every rank had aborted
        for free, total, holding, states in cluster.pool_states():
            assert free == total and not holding and not states

        sampled = cluster.execute(plan())
        ref = InstanceWorker(WorkerConfig(model=model, kv_slots=KV_SLOTS, num_threads=1))
        want = generate_tokens(ref, {"r": prompt}, 1, sampling=sampling)["r"][0]
        assert sampled["r"].token_id == want.token_id
        cluster.execute(IterationPlan(next_id(), releases=(Release("r", ring, ReleaseReason.FINISHED),)))
        for free, total, holding, states in cluster.pool_states():
            assert free == total and not holding and not states
