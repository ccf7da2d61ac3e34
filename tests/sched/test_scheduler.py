"""ESPScheduler on hand-made scenarios, driven by a fake clock with chosen tokens."""

import pytest

from esp_core.sched.admission import PeakMemoryCheck
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.interface import ClusterSpec, FinishReason, RequestRejected, Scheduler
from esp_core.sched.plan import (
    BatchResult,
    NewRequest,
    PrefillBatch,
    ReleaseReason,
    SampledToken,
    SamplingParams,
)
from esp_core.sched.plan_check import check_plan, snapshot
from esp_core.sched.scheduler import ESPScheduler
from esp_core.sched.scheduler_state import Algorithms

from .fake_clock import run

COST = CostModel.default_a800()


def make(n=4, slots=10_000, **cfg) -> ESPScheduler:
    return ESPScheduler(ClusterSpec(n, slots), COST, ESPSchedulerConfig(**cfg))


def req(rid, prompt_len, max_tokens=4, t=0.0, **sp) -> NewRequest:
    return NewRequest(rid, tuple(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens, **sp), t)


def test_implements_the_protocol():
    assert isinstance(make(), Scheduler)


def test_single_request_lifecycle_prefill_decode_finish():
    s = make()
    s.add_request(req("a", 100, max_tokens=3), 0.0)
    plan = s.schedule(0.0)
    assert [r.request_id for r in plan.new_requests] == ["a"]
    (pb,) = plan.prefills
    (item,) = pb.items
    assert item.tokens.start == 0 and item.tokens.end == 100 and item.sample
    assert sum(k.num_tokens for k in item.keep) == 100
    # the scheduler committed the kept slots at plan time
    assert sum(s.kv_free_slots()) == 4 * 10_000 - 100
    ev = s.update(BatchResult(pb.batch_id, "prefill", pb.instances, (SampledToken("a", 11),)), 0.1)
    assert ev[0].token.token_id == 11 and ev[0].finish_reason is None
    plan = s.schedule(0.1)
    assert not plan.prefills and not plan.new_requests
    (db,) = plan.decodes
    (d,) = db.items
    assert d.input_token == 11 and d.position == 100 and d.master in db.instances
    assert set(d.holders) == {k.instance for k in item.keep}
    ev = s.update(BatchResult(db.batch_id, "decode", db.instances, (SampledToken("a", 12),)), 0.2)
    assert ev[0].finish_reason is None
    plan = s.schedule(0.2)
    (db,) = plan.decodes
    ev = s.update(BatchResult(db.batch_id, "decode", db.instances, (SampledToken("a", 13),)), 0.3)
    assert ev[0].finish_reason == FinishReason.LENGTH and ev[0].num_output_tokens == 3
    plan = s.schedule(0.3)
    (rel,) = plan.releases
    assert rel.request_id == "a" and rel.reason == ReleaseReason.FINISHED
    assert s.kv_free_slots() == [10_000] * 4
    assert not s.has_unfinished()


EOS = 2


@pytest.mark.parametrize(
    "sp,tokens,expect_len,reason",
    [
        ({}, [5, EOS, 6], 2, FinishReason.STOP),  # EOS stops
        ({"ignore_eos": True}, [5, EOS, 6, 7], 4, FinishReason.LENGTH),
        ({"min_tokens": 3}, [EOS, EOS, EOS, 9], 3, FinishReason.STOP),  # EOS ignored before 3
        ({"stop_token_ids": (9,)}, [5, 9, 6], 2, FinishReason.STOP),
        ({"stop_token_ids": (9,), "ignore_eos": True}, [EOS, 9, 6], 2, FinishReason.STOP),
    ],
)
def test_finish_rules(sp, tokens, expect_len, reason):
    s = make(eos_token_ids=(EOS,))
    s.add_request(req("a", 10, max_tokens=4, **sp), 0.0)
    res = run(s, [], token_fn=lambda rid, k: tokens[k])
    assert res.finishes["a"] == reason
    assert len(res.tokens["a"]) == expect_len


def test_context_length_exceeded_is_rejected():
    s = make(n=2, slots=1000)
    with pytest.raises(RequestRejected) as e:
        s.add_request(req("a", 1990, max_tokens=20), 0.0)
    assert e.value.code == "context_length_exceeded"
    s.add_request(req("b", 1980, max_tokens=20), 0.0)  # exactly fits the whole group
    s2 = make(max_model_len=512)
    with pytest.raises(RequestRejected):
        s2.add_request(req("c", 500, max_tokens=20), 0.0)
    with pytest.raises(RequestRejected):
        s.add_request(req("b", 10), 0.0)  # duplicate id


def test_a_request_longer_than_one_instance_is_split_over_several():
    s = make(n=4, slots=1000)
    s.add_request(req("a", 2500, max_tokens=8), 0.0)
    res = run(s, [], keep_plans=True)
    assert res.finishes["a"] == FinishReason.LENGTH
    (pb,) = res.plans[0].prefills
    assert len(pb.items[0].keep) >= 3 and pb.dop >= 3
    assert s.kv_free_slots() == [1000] * 4


@pytest.mark.parametrize("phase_time", [0.0, 0.005, 0.05])
def test_abort_while_waiting_prefilling_or_decoding(phase_time):
    s = make()
    arrivals = [(0.0, req("a", 500, max_tokens=50)), (0.0, req("b", 300, max_tokens=5))]
    res = run(s, arrivals, aborts=[(phase_time, "a")])
    assert res.finishes["a"] == FinishReason.ABORT
    assert res.finishes["b"] == FinishReason.LENGTH
    assert s.kv_free_slots() == [10_000] * 4
    assert not s.has_unfinished()


def test_failed_batch_finishes_its_requests_with_error():
    s = make()
    res = run(s, [(0.0, req("a", 50)), (0.0, req("b", 60))], fail_batches={1})
    assert set(res.finishes.values()) <= {FinishReason.ERROR, FinishReason.LENGTH}
    assert FinishReason.ERROR in res.finishes.values()
    assert s.kv_free_slots() == [10_000] * 4


def test_stripe_offsets_rotate_per_request():
    s = make(n=4)
    for i in range(8):
        s.add_request(req(f"r{i}", 64 + i, max_tokens=1), 0.0)
    plan = s.schedule(0.0)
    offsets = [it.stripe_offset for b in plan.prefills for it in b.items]
    assert len(offsets) == 8
    assert len(set(offsets)) > 1 or all(b.dop == 1 for b in plan.prefills)


def test_peak_memory_check_admits_exactly_what_fits():
    # peak with both: rem 10, 10; len 100, 100 -> max(10*1 + 100, 10*2 + 200) = 220
    s = make(n=1, slots=220, headroom_tokens=0)
    s.add_request(req("a", 100, max_tokens=10), 0.0)
    s.add_request(req("b", 100, max_tokens=10), 0.0)
    res = run(s, [], keep_plans=True)
    assert len([it for b in res.plans[0].prefills for it in b.items]) == 2
    assert res.finishes == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    assert s.stats["preemptions"] == 0
    # one slot less: b waits until a is done
    s = make(n=1, slots=219, headroom_tokens=0)
    s.add_request(req("a", 100, max_tokens=10), 0.0)
    s.add_request(req("b", 100, max_tokens=10), 0.0)
    res = run(s, [], keep_plans=True)
    assert [it.request_id for b in res.plans[0].prefills for it in b.items] == ["a"]
    assert res.finishes == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}


def test_decode_overflow_preempts_the_latest_and_reprefills_prompt_plus_outputs():
    # the memory check prevents overflow; give it a huge capacity (admit everything)
    def admit_everything(load, bound, capacity):
        return PeakMemoryCheck.deferred(load, bound, 10**12)

    # two prompts of 100 and 3 outputs each need 2 * 102 = 204 slots in decode
    g = ESPScheduler(
        ClusterSpec(1, 203),
        COST,
        ESPSchedulerConfig(headroom_tokens=0),
        Algorithms(memory_check=admit_everything),
    )
    g.add_request(req("a", 100, max_tokens=3, t=0.0), 0.0)
    g.add_request(req("b", 100, max_tokens=3, t=0.001), 0.0)
    res = run(g, [], keep_plans=True, token_fn=lambda rid, k: 40 + k)
    assert res.finishes == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    assert g.stats["preemptions"] >= 1
    rels = [r for p in res.plans for r in p.releases if r.reason == ReleaseReason.PREEMPTED]
    assert rels and rels[0].request_id == "b"  # the latest arrival goes
    # b's re-prefill covers prompt + its generated tokens, passed as extra_token_ids
    re = [
        it
        for p in res.plans
        for pb in p.prefills
        for it in pb.items
        if it.request_id == "b" and it.tokens.end > 100
    ]
    assert (
        re
        and re[0].tokens.start == 0
        and re[0].extra_token_ids == tuple(res.tokens["b"][: re[0].tokens.end - 100])
    )
    assert res.tokens["b"] == [40, 41, 42]
    assert g.kv_free_slots() == [203]


def test_scale_up_adds_an_instance_when_kv_runs_out():
    s = make(n=2, slots=120, headroom_tokens=0)
    s.add_request(req("a", 100, max_tokens=60), 0.0)
    res = run(s, [], keep_plans=True)
    assert res.finishes["a"] == FinishReason.LENGTH
    decode_sets = {b.instances for p in res.plans for b in p.decodes}
    assert any(len(d) == 2 for d in decode_sets)
    assert s.stats["scale_ups"] >= 1


def test_chunked_prefill_splits_long_prompt_and_lets_short_requests_in():
    s = make(n=4, slots=50_000, chunked_prefill=True, chunk_tokens=2000)
    arrivals = [(0.0, req("long", 9000, max_tokens=2)), (0.0005, req("short", 100, max_tokens=2))]
    res = run(
        s, arrivals, keep_plans=True, step_time=lambda b: 0.01 if isinstance(b, PrefillBatch) else 0.001
    )
    chunks = [
        (it.tokens, it.cached_holders, it.sample)
        for p in res.plans
        for b in p.prefills
        for it in b.items
        if it.request_id == "long"
    ]
    # contiguous chunks of at most chunk_tokens (shorter while they take the instance
    # left to short requests: short_wait_budget_s), only the last one samples
    assert chunks[0][0].start == 0 and chunks[-1][0].end == 9000
    assert all(a[0].end == b[0].start for a, b in zip(chunks, chunks[1:]))
    assert all(len(c[0]) <= 2000 for c in chunks)
    assert chunks[0][1] == () and all(c[1] for c in chunks[1:])
    assert [c[2] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    # the short request got its first token before the long prompt finished
    assert res.first_token_time["short"] < res.first_token_time["long"]
    assert s.kv_free_slots() == [50_000] * 4


def test_loongserve_mode_uses_its_constants():
    cfg = ESPSchedulerConfig.loongserve("sharegpt")
    assert cfg.max_skip_ahead == 1 and cfg.decode_batch_threshold == 128
    assert cfg.constant_decode_time_s == 0.025 and cfg.prefill_check_interval_steps == 10
    assert not cfg.chunked_prefill and not cfg.allow_migration
    with pytest.raises(ValueError):
        ESPSchedulerConfig(policy="loongserve", chunked_prefill=True)
    s = ESPScheduler(ClusterSpec(4, 10_000), COST, cfg)
    res = run(s, [(0.001 * i, req(f"r{i}", 200 + 37 * i, max_tokens=5)) for i in range(20)])
    assert len(res.finishes) == 20
    assert s.stats["migrations"] == 0


def test_paused_decode_group_is_merged_after_the_prefill():
    # one instance only: a later prefill must borrow the decode group's instance
    s = make(n=1, slots=10_000)
    arrivals = [(0.0, req("a", 100, max_tokens=40)), (0.05, req("b", 100, max_tokens=5))]
    res = run(s, arrivals, keep_plans=True)
    assert len(res.finishes) == 2
    paused = [p for p in res.plans if p.paused]
    assert paused and paused[0].paused == ("a",)
    # after b's prefill both decode in one batch
    assert any({it.request_id for it in b.items} == {"a", "b"} for p in res.plans for b in p.decodes)


def test_check_plan_rejects_an_inconsistent_plan():
    s = make(n=2)
    s.add_request(req("a", 100), 0.0)
    before = snapshot(s)
    plan = s.schedule(0.0)
    check_plan(plan, before)
    import dataclasses

    pb = plan.prefills[0]
    bad_item = dataclasses.replace(pb.items[0], keep=())
    bad = dataclasses.replace(plan, prefills=(dataclasses.replace(pb, items=(bad_item,)),))
    with pytest.raises(AssertionError):
        check_plan(bad, before)
    twice = dataclasses.replace(plan, prefills=(pb, dataclasses.replace(pb, batch_id=99)))
    with pytest.raises(AssertionError):
        check_plan(twice, before)


def test_compaction_migrates_kv_to_free_an_instance_for_a_new_prefill():
    # one DP group each way: all admitted requests form one batch over both instances;
    # keeps: x (700) and y (200) on instance 0, z (500) on 1. When x finishes, y's KV
    # (~200) fits on instance 1: a new request gets instance 0 by migration, no pause.
    s = make(n=2, slots=1000, dp_max_request_groups=1, dp_max_batch_groups=1)
    arrivals = [
        (0.0, req("x", 700, max_tokens=3)),
        (0.0, req("y", 200, max_tokens=60)),
        (0.0, req("z", 500, max_tokens=60)),
        (0.1, req("new", 100, max_tokens=2)),
    ]
    res = run(s, arrivals, keep_plans=True)
    assert len(res.finishes) == 4
    keeps = {it.request_id: [k.instance for k in it.keep] for b in res.plans[0].prefills for it in b.items}
    assert keeps == {"x": [0], "y": [0], "z": [1]}
    mig = [p for p in res.plans if p.migrations]
    assert mig, "expected a compaction"
    p = mig[0]
    assert {(m.request_id, m.src, m.dst) for m in p.migrations} == {("y", 0, 1)}
    (pb,) = p.prefills
    assert [it.request_id for it in pb.items] == ["new"] and pb.instances == (0,)
    # the decode group keeps stepping in the same plan, on the instance it kept
    (db,) = p.decodes
    assert db.instances == (1,) and not p.paused
    assert {it.request_id: it.holders for it in db.items} == {"y": (1,), "z": (1,)}
    assert s.stats["pauses"] == 0


def test_compute_bound_decode_scales_up_in_loongserve_mode_past_theta():
    # one DP group: the six requests prefill as one batch and all keep on instance 0
    cfg = ESPSchedulerConfig.loongserve(
        decode_batch_threshold=2, dp_max_request_groups=1, dp_max_batch_groups=1
    )
    s = ESPScheduler(ClusterSpec(4, 10_000), COST, cfg)
    arrivals = [(0.0, req(f"r{i}", 50, max_tokens=6)) for i in range(6)]
    res = run(s, arrivals, keep_plans=True)
    assert len(res.finishes) == 6
    sizes = [len(b.instances) for p in res.plans for b in p.decodes]
    assert max(sizes) >= 3  # 6 requests, θ = 2 per instance
    masters = [[it.master for it in b.items] for p in res.plans for b in p.decodes if len(b.items) == 6]
    assert masters and max(m.count(x) for m in masters for x in m) <= 2


def test_resumed_request_is_reprefilled_over_prompt_plus_outputs_and_continues():
    # after a fault the controller hands a fresh scheduler a request with 2 streamed outputs
    s = make()
    s.add_resumed_request(req("a", 100, max_tokens=4, seed=7), [40, 41], 0.0)
    before = snapshot(s)
    plan = s.schedule(0.0)
    check_plan(plan, before)
    assert [r.request_id for r in plan.new_requests] == ["a"]  # fresh instances learn it
    (pb,) = plan.prefills
    (item,) = pb.items
    assert item.tokens.start == 0 and item.tokens.end == 102 and item.sample
    assert item.extra_token_ids == (40, 41)
    ev = s.update(BatchResult(pb.batch_id, "prefill", pb.instances, (SampledToken("a", 42),)), 0.1)
    assert ev[0].token.token_id == 42 and ev[0].num_output_tokens == 3
    assert ev[0].finish_reason is None
    assert s.output_ids("a") == [40, 41, 42] and s.output_ids("zz") is None  # a rebuild resumes over them
    plan = s.schedule(0.1)
    (db,) = plan.decodes
    (d,) = db.items
    assert d.input_token == 42 and d.position == 102
    ev = s.update(BatchResult(db.batch_id, "decode", db.instances, (SampledToken("a", 43),)), 0.2)
    assert ev[0].finish_reason == FinishReason.LENGTH and ev[0].num_output_tokens == 4
    s.schedule(0.2)
    s.check_invariants()
    assert s.kv_free_slots() == [10_000] * 4 and not s.has_unfinished()
    # no outputs yet: an ordinary request; nothing left to generate: rejected
    s.add_resumed_request(req("b", 10), [], 0.3)
    assert s.requests["b"].outputs == []
    with pytest.raises(RequestRejected):
        s.add_resumed_request(req("c", 10, max_tokens=2), [5, 6], 0.3)
    assert "c" not in s.requests


def test_set_cost_model_is_used_from_the_next_call_on():
    s = make(n=1)
    s.add_request(req("a", 1000), 0.0)
    analytical = CostModel.analytical(hw=HardwareSpec.h200())
    assert analytical.prefill_time(1, 1000, 1000**2, 1) != COST.prefill_time(1, 1000, 1000**2, 1)
    s.set_cost_model(analytical)
    assert s.cost is analytical
    plan = s.schedule(0.0)
    (batch,) = plan.prefills
    # the running batch's estimated end comes from the new model
    assert s.running[batch.batch_id].est_end == analytical.prefill_time(1, 1000, 1000**2, 1)
