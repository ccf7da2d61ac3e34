"""A batch that fails on one TP rank of an instance: the other rank, blocked in an
all-reduce with it, fails promptly (the failing rank gives up its group, closing its
connections), not after the collective timeout (here 300 s, far beyond the 90 s this test
allows). Both ranks report the batch failed, which makes the controller re-form the group.

Two processes = 1 instance x TP 2, joined as the serving path joins them
(`init_tp_esp_group`); the fault is injected into TP rank 1's local prefill only."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from tests.support.dist import free_port
from tests.support.esp import save_tiny_model
from tests.support.runtime import prefill_item, prefill_plan

pytestmark = pytest.mark.slow

COLLECTIVE_TIMEOUT_S = 300.0
PROMPT = [256] + list(range(40, 100))


def _rank_main(tp_rank, port, model, plan, out, done):
    import torch

    import esp_core.runtime.worker as worker_module
    from esp_core.runtime.comm import RankLayout
    from esp_core.runtime.tensor_parallel import init_tp_esp_group

    torch.set_num_threads(1)
    try:
        comm, tp = init_tp_esp_group(
            0, tp_rank, RankLayout(1, 2), f"tcp://127.0.0.1:{port}", timeout_s=COLLECTIVE_TIMEOUT_S
        )
        worker = InstanceWorker(WorkerConfig(model=model, kv_slots=256, num_threads=1), 0, 1, tp)
        worker.comm = comm
        if tp_rank == 1:

            def broken(*args, **kwargs):
                raise RuntimeError("injected fault before the first all-reduce")

            worker_module.prefill_local = broken  # this process only
        t0 = time.monotonic()
        results = worker.execute(plan)
        out.put((tp_rank, [r.error for r in results], time.monotonic() - t0))
    except Exception as e:  # reported to the test, never a hang
        out.put((tp_rank, repr(e), None))
    done.wait(120)  # alive, as an instance actor stays: its exit must not be what unblocks the peer


def test_a_failure_on_one_tp_rank_fails_its_peer_promptly(tmp_path):
    from esp_core.sched.plan import NewRequest, SamplingParams

    model = str(save_tiny_model(tmp_path / "m", seed=3, num_heads=4, num_kv_heads=2))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    plan = prefill_plan(
        [prefill_item("r", 0, len(PROMPT))], new_requests=[NewRequest("r", tuple(PROMPT), params)]
    )
    ctx = mp.get_context("spawn")
    out, done, port = ctx.Queue(), ctx.Event(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(t, port, model, plan, out, done)) for t in range(2)]
    for p in procs:
        p.start()
    try:
        answers = sorted(out.get(timeout=90) for _ in procs)
    finally:
        done.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    (r0, errors0, took0), (r1, errors1, _) = answers
    assert isinstance(errors0, list) and isinstance(errors1, list), answers
    assert errors1 == ["RuntimeError: injected fault before the first all-reduce"]
    # the peer's all-reduce failed on the closed connection, long before its timeout
    assert len(errors0) == 1 and errors0[0], errors0
    assert took0 < 60, took0
