"""Decode look-ahead on a real instance: the ESPScheduler's plans (look-ahead on and
off) executed by one InstanceWorker in the controller's order -- every plan the
scheduler makes is queued, the oldest runs, its results update the scheduler, which is
asked again until its plan is empty -- give the greedy tokens of the single-instance
reference, including a request that stops at EOS while its look-ahead step is queued.
A look-ahead item the instance cannot resolve fails with a clear message."""

from __future__ import annotations

import collections

import pytest

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import DecodeBatch, DecodeItem, IterationPlan, NewRequest, SamplingParams
from esp_core.sched.plan_check import check_plan, snapshot
from esp_core.sched.scheduler import ESPScheduler
from tests.support.runtime import generate, prefill_item, prefill_plan, run_one

SLOTS = 512
PROMPTS = {"a": [256, 72, 105, 33, 9], "b": [256, 10, 11], "c": [256, 40, 41, 42, 43, 44, 45]}
N_OUT = {"a": 12, "b": 7, "c": 10}


@pytest.fixture(scope="module")
def worker() -> InstanceWorker:
    return InstanceWorker(WorkerConfig(kv_slots=SLOTS, num_threads=1))


@pytest.fixture(scope="module")
def reference(worker) -> dict[str, list[int]]:
    return {rid: generate(worker, {rid: p}, N_OUT[rid])[rid] for rid, p in PROMPTS.items()}


def serve(
    worker: InstanceWorker, lookahead: bool, eos: tuple[int, ...]
) -> tuple[dict[str, list[int]], int, collections.Counter[str]]:
    """Every request through the scheduler and `worker`; returns each request's streamed
    tokens, how many look-ahead steps ran and how many tokens the instance sampled for
    each request."""
    config = ESPSchedulerConfig(eos_token_ids=eos, decode_lookahead=lookahead)
    sched = ESPScheduler(ClusterSpec(1, SLOTS), CostModel.default_a800(), config)
    for i, (rid, p) in enumerate(PROMPTS.items()):
        sp = SamplingParams(max_tokens=N_OUT[rid], temperature=0.0)
        sched.add_request(NewRequest(rid, tuple(p), sp, arrival_time=0.001 * i), 0.0)
    sent: collections.deque[IterationPlan] = collections.deque()
    got: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    lookaheads = 0
    sampled: collections.Counter[str] = collections.Counter()
    now = 0.0
    for _ in range(200):
        while True:  # the controller: plan until a plan is empty
            before = snapshot(sched)
            plan = sched.schedule(now)
            check_plan(plan, before)
            if plan.is_empty:
                break
            sent.append(plan)
            lookaheads += sum(b.is_lookahead for b in plan.decodes)
        if not sent:
            assert not sched.has_unfinished()
            break
        for result in worker.execute(sent.popleft()):  # the instance: in order
            assert result.error is None, result.error
            now += 0.01
            sampled.update(t.request_id for t in result.sampled)
            for ev in sched.update(result, now):
                if ev.token is not None:
                    got[ev.request_id].append(ev.token.token_id)
        sched.check_invariants()
    assert worker.kv_free_slots() == SLOTS and not worker.states
    return got, lookaheads, sampled


def test_lookahead_tokens_match_the_reference(worker, reference):
    got_on, lookaheads, _ = serve(worker, lookahead=True, eos=())
    got_off, none, _ = serve(worker, lookahead=False, eos=())
    assert got_on == got_off == reference
    assert lookaheads >= 5 and none == 0  # (none before a finish: the pipeline waits)


def test_stop_at_eos_while_the_lookahead_step_is_queued(worker, reference):
    # a token "a" samples at its 5th output is the EOS: "a" stops there (its look-ahead
    # step, already queued, still runs; its token is dropped)
    eos = reference["a"][4]
    expected = {}
    for rid, toks in reference.items():
        cut = toks.index(eos) + 1 if eos in toks else len(toks)
        expected[rid] = toks[:cut]
    got, lookaheads, sampled = serve(worker, lookahead=True, eos=(eos,))
    assert got == expected and lookaheads > 0
    assert sampled["a"] == len(expected["a"]) + 1  # the look-ahead's token, dropped


def test_lookahead_item_without_a_sampled_token_fails_clearly(worker):
    new = NewRequest("z", (256, 5, 6), SamplingParams(max_tokens=4, temperature=0.0))
    run_one(worker, prefill_plan([prefill_item("z", 0, 3)], [new]))  # sampled by a prefill
    item = DecodeItem("z", None, 3, master=0, holders=(0,), new_kv_instance=0)
    plan = IterationPlan(90_001, decodes=(DecodeBatch(90_002, (0,), (item,)),))
    (result,) = worker.execute(plan)
    assert result.error is not None and "look-ahead" in result.error and "position 3" in result.error
    worker.reset()
