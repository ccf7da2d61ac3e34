"""Per-instance sub-plans and result combination (the controller's pure part).

The controller only narrows the scheduler's plan: the last tests replay real scheduler
runs (merges, scale-ups, preemptions, chunks, prefix-cache hits) split per instance and
check that every instance of every batch has the request and the outputs it needs."""

from __future__ import annotations

import random

import pytest

from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVAdoption,
    KVKeep,
    Migration,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    RequestJoin,
    SampledToken,
    SamplingParams,
    TokenRange,
)
from esp_serve.app.dispatch import ResultCombiner, sub_plan
from tests.sched.fake_clock import a800_scheduler as make_scheduler
from tests.sched.fake_clock import prompt_request, run
from tests.support.instance_knowledge import replay


def plan() -> IterationPlan:
    a, b = NewRequest("a", (1, 2, 3), SamplingParams()), NewRequest("b", (4, 5), SamplingParams())
    pa = PrefillBatch(1, (0,), (PrefillItem("a", TokenRange(0, 3), 0, (KVKeep(0, (TokenRange(0, 3),)),)),))
    pb = PrefillBatch(2, (1, 2), (PrefillItem("b", TokenRange(0, 2), 0, (KVKeep(1, (TokenRange(0, 2),)),)),))
    dc = DecodeBatch(3, (0, 2), (DecodeItem("c", 9, 12, master=2, holders=(0, 2), new_kv_instance=2),))
    return IterationPlan(
        7,
        new_requests=(a, b),
        prefills=(pa, pb),
        decodes=(dc,),
        migrations=(Migration("m", 2, 3, (TokenRange(0, 1),)),),
        releases=(Release("x", (0, 1), ReleaseReason.FINISHED),),
        joins=(RequestJoin("a", (0,)), RequestJoin("b", (1, 2))),
    )


def test_sub_plans_keep_only_what_concerns_each_instance():
    p = plan()
    s0 = sub_plan(p, 0)
    assert [b.batch_id for b in s0.batches()] == [1, 3]
    assert [r.request_id for r in s0.new_requests] == ["a"]
    assert s0.releases == (Release("x", (0,), ReleaseReason.FINISHED),)
    assert s0.migrations == () and s0.plan_id == 7
    s1 = sub_plan(p, 1)
    assert [b.batch_id for b in s1.batches()] == [2]
    assert [r.request_id for r in s1.new_requests] == ["b"]
    assert s1.releases[0].instances == (1,)
    s2 = sub_plan(p, 2)
    assert [b.batch_id for b in s2.batches()] == [2, 3] and len(s2.migrations) == 1
    assert [r.request_id for r in s2.new_requests] == ["b"] and s2.joins == (RequestJoin("b", (2,)),)
    s3 = sub_plan(p, 3)
    assert s3.batches() == () and len(s3.migrations) == 1
    assert sub_plan(p, 4) is None


def test_narrowing_sends_a_request_only_where_its_join_says_and_changes_no_item():
    """A new master joins a request's decode: the scheduler's plan names it in a join and
    carries the outputs it lacks; the instance that prefilled it gets the same item and
    not the request again."""
    req = NewRequest("r", (1, 2, 3), SamplingParams(max_tokens=8))
    item = DecodeItem("r", 41, 4, master=1, holders=(0,), new_kv_instance=1, output_prefix=(40,))
    p = IterationPlan(
        2,
        new_requests=(req,),
        decodes=(DecodeBatch(2, (0, 1), (item,)),),
        joins=(RequestJoin("r", (1,)),),
    )
    s1, s0 = sub_plan(p, 1), sub_plan(p, 0)
    assert s1.new_requests == (req,) and s1.joins == (RequestJoin("r", (1,)),)
    assert s0.new_requests == () and s0.joins == ()
    assert s0.decodes == s1.decodes == p.decodes


def test_combiner_merges_a_batch_over_its_instances():
    c = ResultCombiner()
    batch = DecodeBatch(5, (0, 2), ())
    c.expect(batch)
    assert c.add(2, BatchResult(5, "decode", (2,), (SampledToken("a", 1),), 0.5)) is None
    out = c.add(0, BatchResult(5, "decode", (0,), (SampledToken("b", 2),), 0.2))
    assert out == BatchResult(
        5, "decode", (0, 2), (SampledToken("b", 2), SampledToken("a", 1)), elapsed_s=0.5
    )
    assert c.pending() == 0
    c.expect(batch)
    c.add(0, BatchResult(5, "decode", (0,), elapsed_s=0.1))
    failed = c.fail(2, 5, "actor died")
    assert failed.error == "instance 2: actor died" and failed.kind == "decode"
    with pytest.raises(KeyError):
        c.add(0, BatchResult(99, "decode", (0,)))


def test_adoptions_go_to_every_instance_holding_the_entry():
    ad = KVAdoption("old", "new", 512, (1, 3), (KVKeep(1, (TokenRange(0, 512),)),))
    p = IterationPlan(9, adoptions=(ad,))
    assert sub_plan(p, 0) is None
    assert sub_plan(p, 1).adoptions == (ad,) and sub_plan(p, 3).adoptions == (ad,)


def _workload(seed: int, shared_prefix: bool) -> list[tuple[float, NewRequest]]:
    """Requests that overfill small pools: long prompts spread over instances, outputs
    that outgrow them (scale-up, preemption), short ones that decode apart (merges)."""
    rng = random.Random(seed)
    out = []
    for i in range(12):
        t = rng.uniform(0.0, 0.05)
        n = rng.choice([20, 60, 150, 400, 900])
        prompt = tuple([5] * n) if shared_prefix else tuple(range(3 + i, 3 + i + n))
        out.append((t, NewRequest(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(2, 40)), t)))
    return out


CHUNKED = dict(chunked_prefill=True, chunk_tokens=300, long_request_max_wait_s=0.05)
REPLAYED = {
    "esp": dict(headroom_tokens=0),
    "esp-chunked-merge": dict(**CHUNKED, merge_decode_groups=True, adaptive_chunking=True),
    "esp-chunked-pack": dict(**CHUNKED, pack_decode=True, pack_step_slowdown=3.0),
    "esp-cache": dict(**CHUNKED, prefix_cache=True, prefix_block_tokens=16),
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(REPLAYED))
def test_scheduler_plans_split_per_instance_give_every_instance_what_it_needs(name, seed):
    sched = make_scheduler(4, 700, **REPLAYED[name])
    res = run(sched, _workload(seed, name == "esp-cache"), keep_plans=True, token_fn=lambda rid, k: 50 + k)
    assert len(res.finishes) == 12
    instances = replay(res.plans, 4, res.tokens)  # raises where an instance would lack something
    for inst in instances:  # each request reaches an instance once (a preemption keeps it)
        assert all(n == 1 for n in inst.received.values()), (inst.instance, inst.received)


def test_a_scale_up_sends_the_earlier_outputs_to_the_instance_added():
    """Prefilled on (0, 1) and kept on 0; decode scales up onto 1 when 0 fills: 1 has the
    request (from the prefill) but none of its outputs, so only the prefix is sent."""
    sched = make_scheduler(2, 120, headroom_tokens=0)
    sched.add_request(prompt_request("a", 100, 60, 0.0), 0.0)
    res = run(sched, [], keep_plans=True)
    assert sched.stats["scale_ups"] >= 1
    first, *_ = res.plans
    assert first.joins == (RequestJoin("a", first.prefills[0].instances),)
    up = next(p for p in res.plans if p.decodes and len(p.decodes[0].instances) == 2)
    (item,) = up.decodes[0].items
    assert not up.joins and up.new_requests == ()
    assert item.output_prefix == tuple(res.tokens["a"][: item.position - 100]) != ()
    # the steps after: both know everything, nothing is sent
    later = [p for p in res.plans if p.plan_id > up.plan_id and p.decodes]
    assert later and all(not p.joins and not p.decodes[0].items[0].output_prefix for p in later)
    replay(res.plans, 2, res.tokens)


def test_a_decode_merge_sends_the_moved_request_to_the_instance_it_moves_to():
    arrivals = [(0.0, prompt_request("a", 300, 200, 0.0)), (0.001, prompt_request("b", 200, 200, 0.001))]
    sched = make_scheduler(merge_decode_groups=True)
    res = run(sched, arrivals, keep_plans=True)
    assert sched.stats["decode_merges"] == 1
    (move,) = [m for p in res.plans for m in p.migrations]
    plan = next(
        p
        for p in res.plans
        for b in p.decodes
        for it in b.items
        if it.master == move.dst and it.request_id == move.request_id
    )
    assert RequestJoin(move.request_id, (move.dst,)) in plan.joins
    (item,) = [it for b in plan.decodes for it in b.items if it.request_id == move.request_id]
    prompt = 300 if move.request_id == "a" else 200
    assert item.output_prefix == tuple(res.tokens[move.request_id][: item.position - prompt])
    replay(res.plans, 4, res.tokens)
