"""Processes that join an ESP group of 2 instances x TP 2 on their own (what instance
actors do): `init_tp_esp_group` sets up the world, the TP groups and the P2P endpoints,
and a ring prefill across both instances then samples what an unsharded instance does."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from tests.support.dist import free_port
from tests.support.esp import even_keep, next_id, prefill_batch, prefill_item, save_tiny_model
from tests.support.runtime import generate

pytestmark = pytest.mark.slow

PROMPTS = {"a": [256] + list(range(40, 80)), "b": [256, 7, 9, 11, 13, 15, 17]}


def _rank_main(instance, tp_rank, port, model, plan, out):
    import torch

    from esp_core.runtime.comm import RankLayout
    from esp_core.runtime.tensor_parallel import init_tp_esp_group

    torch.set_num_threads(1)
    layout = RankLayout(2, 2)
    try:
        comm, tp = init_tp_esp_group(instance, tp_rank, layout, f"tcp://127.0.0.1:{port}", timeout_s=60)
        worker = InstanceWorker(WorkerConfig(model=model, kv_slots=256, num_threads=1), instance, 2, tp)
        worker.comm = comm
        results = worker.execute(plan)
        out.put(
            (instance, tp_rank, [(r.error, [(t.request_id, t.token_id) for t in r.sampled]) for r in results])
        )
    except Exception as e:  # reported to the test, never a hang
        out.put((instance, tp_rank, repr(e)))


def test_processes_join_as_tp_ranks_and_run_esp(tmp_path):
    from esp_core.sched.plan import IterationPlan, NewRequest, SamplingParams

    model = str(save_tiny_model(tmp_path / "m", seed=8, num_heads=4, num_kv_heads=2))
    ref = generate(InstanceWorker(WorkerConfig(model=model, kv_slots=256, num_threads=1)), PROMPTS, 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    items = [
        prefill_item(r, 0, len(p), offset=i, keep=even_keep(0, len(p), (0, 1)))
        for i, (r, p) in enumerate(PROMPTS.items())
    ]
    plan = IterationPlan(
        next_id(),
        new_requests=tuple(NewRequest(r, tuple(p), params) for r, p in PROMPTS.items()),
        prefills=(prefill_batch((0, 1), items),),
    )
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(i, t, port, model, plan, out))
        for i in range(2)
        for t in range(2)
    ]
    for p in procs:
        p.start()
    try:
        answers = [out.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    sampled: dict[tuple[int, int], dict[str, int]] = {}
    for instance, tp_rank, res in answers:
        assert not isinstance(res, str), (instance, tp_rank, res)
        ((error, toks),) = res
        assert error is None, error
        sampled[(instance, tp_rank)] = dict(toks)
    # each request is sampled by one instance, identically on both of its TP ranks
    for instance in (0, 1):
        assert sampled[(instance, 0)] == sampled[(instance, 1)]
    assert not set(sampled[(0, 0)]) & set(sampled[(1, 0)]), sampled
    union = {**sampled[(0, 0)], **sampled[(1, 0)]}
    assert union == {r: toks[0] for r, toks in ref.items()}
