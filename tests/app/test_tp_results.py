"""What the controller reads from an instance of several TP ranks (app/instance_group.py
`lead_results`): TP rank 0's results, unless another rank reports a batch failed."""

from __future__ import annotations

import asyncio
import pickle

from esp_core.sched.plan import BatchResult, SampledToken
from esp_serve.app.instance_group import lead_results


def answer(results: list[BatchResult]) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(pickle.dumps(results))
    return fut


def run(lead: list[BatchResult], others: list[list[BatchResult]]) -> bytes:
    async def main() -> bytes:
        return await lead_results(answer(lead), [answer(o) for o in others])

    return asyncio.run(main())


OK = [
    BatchResult(1, "prefill", (0,), (SampledToken("a", 5),)),
    BatchResult(2, "decode", (0, 1), (SampledToken("b", 7),)),
]


def test_rank_zero_answers_when_every_rank_succeeded():
    out = run(OK, [[]])
    assert pickle.loads(out) == OK


def test_a_batch_failed_on_another_rank_is_failed():
    failed = BatchResult(2, "decode", (0, 1), error="RuntimeError: all_reduce timed out")
    got = {r.batch_id: r for r in pickle.loads(run(OK, [[failed]]))}
    assert got[1] == OK[0]
    assert got[2].error == failed.error and not got[2].sampled


def test_instance_processes_keep_freed_heap_unless_the_environment_says_otherwise(monkeypatch):
    from esp_serve.app.instance_group import MALLOC_ENV, instance_env

    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert instance_env() == MALLOC_ENV
    # above a 32-row x 152K-token fp32 logits block (19.5 MB): served from the kept heap
    assert int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]) >= 32 << 20
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert instance_env()["MALLOC_TRIM_THRESHOLD_"] == "0"
