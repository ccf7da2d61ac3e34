"""LocalScheduler driven with hand-made BatchResults (through a fake KV-accounting executor)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp_core.sched.interface import ClusterSpec, FinishReason, RequestRejected, Scheduler
from esp_core.sched.local import LocalScheduler, LocalSchedulerConfig
from esp_core.sched.plan import BatchResult, NewRequest, ReleaseReason, SamplingParams

from .driver import FakeExecutor

EOS = 99


def make(n=2, slots=100, **cfg) -> tuple[LocalScheduler, FakeExecutor]:
    cfg.setdefault("eos_token_ids", (EOS,))
    sched = LocalScheduler(ClusterSpec(n, slots), LocalSchedulerConfig(**cfg))
    return sched, FakeExecutor(n, slots)


def req(rid: str, prompt_len: int = 4, **sampling) -> NewRequest:
    sampling.setdefault("max_tokens", 3)
    return NewRequest(rid, tuple(range(1, prompt_len + 1)), SamplingParams(**sampling))


def run(sched, ex, max_rounds=1000):
    """Drive until nothing is unfinished; returns all events by request id."""
    events: dict[str, list] = {}
    for _ in range(max_rounds):
        if not sched.has_unfinished():
            return events
        plan = sched.schedule(0.0)
        sched.check_invariants()
        for result in ex.execute(plan):
            for ev in sched.update(result, 0.0):
                events.setdefault(ev.request_id, []).append(ev)
            sched.check_invariants()
    raise AssertionError("did not finish")


def test_is_a_scheduler():
    sched, _ = make()
    assert isinstance(sched, Scheduler)


def test_stats_count_the_batches_it_planned():
    sched, ex = make()
    sched.add_request(req("a", max_tokens=3), 0.0)
    run(sched, ex)
    # one prefill (samples output 1), then one decode step per further output
    assert sched.stats == {"prefill_batches": 1, "decode_steps": 2}


def test_one_request_runs_to_max_tokens_and_frees_its_kv():
    sched, ex = make()
    sched.add_request(req("a", 5, max_tokens=3), 0.0)
    events = run(sched, ex)["a"]
    assert [e.token.token_id for e in events] == [7, 7, 7]
    assert [e.finish_reason for e in events] == [None, None, FinishReason.LENGTH]
    assert events[-1].num_prompt_tokens == 5 and events[-1].num_output_tokens == 3
    # prefill, then 2 decode steps, then a plan with only the release
    kinds = [(len(p.prefills), len(p.decodes), len(p.releases)) for p in ex.plans]
    assert kinds == [(1, 0, 0), (0, 1, 0), (0, 1, 0), (0, 0, 1)]
    assert ex.plans[-1].releases[0].reason == ReleaseReason.FINISHED
    assert ex.plans[0].new_requests == (req("a", 5, max_tokens=3),)
    assert all(not p.new_requests for p in ex.plans[1:])
    assert sched.kv_free_slots() == [100, 100] and ex.free(0) == ex.free(1) == 100


def test_admission_picks_instance_with_most_free_kv():
    sched, ex = make(slots=100)
    sched.add_request(req("big", 10, max_tokens=50), 0.0)
    sched.add_request(req("s1", 4, max_tokens=4), 0.0)
    sched.add_request(req("s2", 4, max_tokens=4), 0.0)
    plan = sched.schedule(0.0)
    placed = {it.request_id: b.instances[0] for b in plan.prefills for it in b.items}
    # big -> 0 (tie broken by lowest index); s1 -> 1 (100 free vs 40); s2 -> 1 (92 vs 40)
    assert placed == {"big": 0, "s1": 1, "s2": 1}
    assert sched.kv_free_slots() == [40, 84]


def test_prefill_and_decode_share_an_instance_in_one_plan():
    sched, ex = make(n=1)
    sched.add_request(req("a", 4, max_tokens=5), 0.0)
    for r in ex.execute(sched.schedule(0.0)):
        sched.update(r, 0.0)
    sched.add_request(req("b", 6, max_tokens=5), 0.0)
    plan = sched.schedule(0.0)
    assert [it.request_id for b in plan.prefills for it in b.items] == ["b"]
    assert [it.request_id for b in plan.decodes for it in b.items] == ["a"]
    assert plan.prefills[0].instances == plan.decodes[0].instances == (0,)
    item = plan.decodes[0].items[0]
    assert (item.input_token, item.position) == (7, 4)


def test_busy_instance_gets_no_new_work_until_its_batches_complete():
    sched, ex = make(n=1)
    sched.add_request(req("a"), 0.0)
    plan = sched.schedule(0.0)
    sched.add_request(req("b"), 0.0)
    assert sched.schedule(0.0).is_empty  # instance 0 still runs the first plan
    for r in ex.execute(plan):
        sched.update(r, 0.0)
    plan2 = sched.schedule(0.0)
    assert len(plan2.prefills) == 1 and len(plan2.decodes) == 1


def test_rejects_what_can_never_fit():
    sched, _ = make(slots=50, max_model_len=40)
    with pytest.raises(RequestRejected) as e:
        sched.add_request(req("a", 30, max_tokens=11), 0.0)
    assert e.value.code == "context_length_exceeded" and "40" in str(e.value)
    sched2, _ = make(slots=50)
    with pytest.raises(RequestRejected) as e:
        sched2.add_request(req("a", 30, max_tokens=21), 0.0)
    assert e.value.code == "context_length_exceeded"
    sched2.add_request(req("ok", 30, max_tokens=20), 0.0)  # exactly fits
    with pytest.raises(RequestRejected):
        sched2.add_request(req("ok", 3), 0.0)  # duplicate id
    with pytest.raises(RequestRejected):
        sched2.add_request(NewRequest("empty", (), SamplingParams()), 0.0)


def test_waits_for_slots_instead_of_over_committing_and_keeps_fcfs():
    sched, ex = make(n=1, slots=30)
    sched.add_request(req("a", 10, max_tokens=10), 0.0)  # reserves 20
    sched.add_request(req("b", 10, max_tokens=10), 0.0)  # does not fit beside a
    sched.add_request(req("c", 2, max_tokens=2), 0.0)  # would fit, but FCFS: waits for b
    plan = sched.schedule(0.0)
    assert [it.request_id for it in plan.prefills[0].items] == ["a"]
    assert sched.num_waiting() == 2
    events = {}
    for r in ex.execute(plan):
        for ev in sched.update(r, 0.0):
            events.setdefault(ev.request_id, []).append(ev)
    events.update(run(sched, ex))
    assert set(events) == {"a", "b", "c"}
    first_prefill = {it.request_id: k for k, p in enumerate(ex.plans) for b in p.prefills for it in b.items}
    assert first_prefill["a"] < first_prefill["b"] <= first_prefill["c"]
    assert ex.free(0) == 30


def test_eos_stop_ids_ignore_eos_and_min_tokens():
    outputs = {"eos": [5, EOS, 5], "ignore": [EOS, EOS, EOS], "min": [EOS, EOS, 5], "stopid": [5, 42, 5]}
    sched, ex = make()
    ex.pick = lambda rid, step: outputs[rid][step]
    sched.add_request(req("eos", max_tokens=3), 0.0)
    sched.add_request(req("ignore", max_tokens=3, ignore_eos=True), 0.0)
    sched.add_request(req("min", max_tokens=3, min_tokens=1), 0.0)
    sched.add_request(req("stopid", max_tokens=3, stop_token_ids=(42,)), 0.0)
    events = run(sched, ex)
    got = {rid: ([e.token.token_id for e in evs], evs[-1].finish_reason) for rid, evs in events.items()}
    assert got == {
        "eos": ([5, EOS], FinishReason.STOP),
        "ignore": ([EOS, EOS, EOS], FinishReason.LENGTH),
        "min": ([EOS, EOS], FinishReason.STOP),  # the first EOS is inside min_tokens
        "stopid": ([5, 42], FinishReason.STOP),
    }
    assert ex.free(0) == ex.free(1) == 100


def test_max_model_len_ends_generation_with_length():
    sched, ex = make(max_model_len=8)
    sched.add_request(req("a", 6, max_tokens=2), 0.0)
    events = run(sched, ex)["a"]
    assert len(events) == 2 and events[-1].finish_reason == FinishReason.LENGTH


def test_abort_waiting_running_and_in_flight_requests():
    sched, ex = make(n=1, slots=20)
    sched.add_request(req("run", 4, max_tokens=10), 0.0)
    sched.add_request(req("wait", 4, max_tokens=10), 0.0)  # 14 + 14 > 20: waits
    plan = sched.schedule(0.0)
    assert [it.request_id for it in plan.prefills[0].items] == ["run"]
    # abort the waiting one: no KV anywhere, nothing to release
    assert [e.finish_reason for e in sched.abort_request("wait", 0.0)] == [FinishReason.ABORT]
    assert sched.abort_request("wait", 0.0) == []
    # abort the running one while its prefill is in flight: its token is dropped
    assert [e.finish_reason for e in sched.abort_request("run", 0.0)] == [FinishReason.ABORT]
    events = [ev for r in ex.execute(plan) for ev in sched.update(r, 0.0)]
    assert events == []
    plan = sched.schedule(0.0)
    assert [(r.request_id, r.reason) for r in plan.releases] == [("run", ReleaseReason.ABORTED)]
    ex.execute(plan)
    assert not sched.has_unfinished() and ex.free(0) == 20 and sched.kv_free_slots() == [20]


def test_abort_between_steps_releases_in_next_plan():
    sched, ex = make(n=1)
    sched.add_request(req("a", max_tokens=10), 0.0)
    for r in ex.execute(sched.schedule(0.0)):
        sched.update(r, 0.0)
    sched.abort_request("a", 0.0)
    plan = sched.schedule(0.0)
    assert not plan.decodes and [r.request_id for r in plan.releases] == ["a"]
    ex.execute(plan)
    assert not sched.has_unfinished() and ex.free(0) == 100


def test_failed_batch_ends_its_requests_with_error_and_frees_kv():
    sched, ex = make(n=1)
    sched.add_request(req("a"), 0.0)
    sched.add_request(req("b"), 0.0)
    plan = sched.schedule(0.0)
    ex.execute(plan)
    (batch,) = plan.prefills
    events = sched.update(BatchResult(batch.batch_id, "prefill", (0,), error="boom"), 0.0)
    assert {(e.request_id, e.finish_reason, e.error) for e in events} == {
        ("a", FinishReason.ERROR, "boom"),
        ("b", FinishReason.ERROR, "boom"),
    }
    ex.execute(sched.schedule(0.0))
    assert not sched.has_unfinished() and ex.free(0) == 100
    with pytest.raises(KeyError):
        sched.update(BatchResult(batch.batch_id, "prefill", (0,)), 0.0)


def test_prefill_token_budget_splits_rounds_but_never_starves_a_long_prompt():
    sched, ex = make(n=1, slots=1000, max_num_batched_tokens=10)
    sched.add_request(req("long", 25, max_tokens=1), 0.0)
    sched.add_request(req("a", 6, max_tokens=1), 0.0)
    sched.add_request(req("b", 6, max_tokens=1), 0.0)
    run(sched, ex)
    prefills = [[it.request_id for b in p.prefills for it in b.items] for p in ex.plans]
    prefills = [p for p in prefills if p]
    assert prefills == [["long"], ["a"], ["b"]]


def test_running_limit_per_instance():
    sched, ex = make(n=1, max_running_per_instance=2)
    for k in range(3):
        sched.add_request(req(f"r{k}"), 0.0)
    plan = sched.schedule(0.0)
    assert len(plan.prefills[0].items) == 2
    for r in ex.execute(plan):
        sched.update(r, 0.0)
    run(sched, ex)
    assert ex.free(0) == 100


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(30, 120), st.integers(1, 25), st.integers(0, 10**6))
def test_random_workloads_never_over_commit_and_finish_exactly_once(n, slots, num, seed):
    rng = random.Random(seed)
    sched, ex = make(n=n, slots=slots, max_num_batched_tokens=rng.randint(5, 60))
    ex.pick = lambda rid, step: rng.choice([EOS, 3, 4, 5, 6])
    ids = []
    for k in range(num):
        prompt = rng.randint(1, 20)
        max_tokens = rng.randint(1, 15)
        r = req(f"r{k}", prompt, max_tokens=max_tokens, ignore_eos=rng.random() < 0.3)
        if prompt + max_tokens > slots:
            with pytest.raises(RequestRejected):
                sched.add_request(r, 0.0)
            continue
        sched.add_request(r, 0.0)
        ids.append(r.request_id)
    aborted: set[str] = set()
    finished: dict[str, int] = {}
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        plan = sched.schedule(0.0)
        results = ex.execute(plan)
        rng.shuffle(results)
        for result in results:
            for ev in sched.update(result, 0.0):
                if ev.finish_reason is not None:
                    finished[ev.request_id] = finished.get(ev.request_id, 0) + 1
        assert all(f >= 0 for f in sched.kv_free_slots())
        if ids and rng.random() < 0.1:
            victim = rng.choice(ids)
            for _ in sched.abort_request(victim, 0.0):
                aborted.add(victim)
                finished[victim] = finished.get(victim, 0) + 1
    assert not sched.has_unfinished()
    assert sorted(finished) == sorted(ids) and set(finished.values()) == {1} if ids else True
    assert sched.kv_free_slots() == [slots] * n
    assert all(ex.free(i) == slots for i in range(n))


def test_resume_after_a_fault_continues_exactly_where_it_stopped():
    sched, ex = make(n=1)
    sched.add_resumed_request(req("a", 5, max_tokens=4), [40, 41], 0.0)
    assert sched.output_ids("a") == [40, 41] and sched.output_ids("zz") is None
    events = run(sched, ex)["a"]
    # two more tokens (outputs 3 and 4), then done; slots: prompt + all outputs
    assert [e.num_output_tokens for e in events] == [3, 4]
    assert events[-1].finish_reason == FinishReason.LENGTH
    first = ex.plans[0].prefills[0].items[0]
    assert first.extra_token_ids == (40, 41) and len(first.tokens) == 7
    assert ex.plans[1].decodes[0].items[0].position == 7  # the token sampled at prefill
    assert sched.kv_free_slots() == [100] and ex.free(0) == 100
    with pytest.raises(RequestRejected):
        sched.add_resumed_request(req("b", 5, max_tokens=2), [1, 2], 0.0)
