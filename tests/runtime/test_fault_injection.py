"""Fault injection of the instance worker (WorkerConfig.fault_token / hang_token), the
testing aid behind recovery.fault_injection_token: a batch holding a request whose prompt
contains the token fails inside the forward, like a real deterministic fault, its slots
are freed and the worker keeps serving other requests."""

from __future__ import annotations

import time

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import NewRequest, SamplingParams
from tests.support.runtime import prefill_item, prefill_plan

POISON = 7
HANG = 8


def _request(rid: str, prompt: list[int]) -> NewRequest:
    return NewRequest(rid, tuple(prompt), SamplingParams(max_tokens=4, temperature=0.0))


def test_a_poison_prompt_fails_its_batch_and_the_worker_serves_on():
    worker = InstanceWorker(WorkerConfig(kv_slots=256, fault_token=POISON, hang_token=HANG, hang_s=0.2))
    total = worker.kv_free_slots()
    poison = _request("p", [256, 72, POISON, 105])
    innocent = _request("a", [256, 72, 105])
    plan = prefill_plan([prefill_item("p", 0, 4), prefill_item("a", 0, 3)], [poison, innocent])
    [result] = worker.execute(plan)
    assert result.error is not None and result.error.startswith("RuntimeError: injected fault")
    assert result.sampled == ()
    assert worker.kv_free_slots() == total  # the failed batch gave its slots back
    # the same innocent request alone runs
    [ok] = worker.execute(prefill_plan([prefill_item("a2", 0, 3)], [_request("a2", [256, 72, 105])]))
    assert ok.error is None and [t.request_id for t in ok.sampled] == ["a2"]


def test_a_hang_prompt_stalls_the_batch_for_hang_s():
    worker = InstanceWorker(WorkerConfig(kv_slots=256, hang_token=HANG, hang_s=0.5))
    t0 = time.perf_counter()
    [result] = worker.execute(prefill_plan([prefill_item("h", 0, 3)], [_request("h", [256, HANG, 105])]))
    assert time.perf_counter() - t0 >= 0.5
    assert result.error is None  # it hangs, then runs: only the controller's watchdog ends it
