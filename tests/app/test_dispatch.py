"""Per-instance sub-plans and result combination (the controller's pure part)."""

from __future__ import annotations

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
    SampledToken,
    SamplingParams,
    TokenRange,
)
from esp_serve.app.dispatch import OutputHistory, ResultCombiner, sub_plan


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
    s3 = sub_plan(p, 3)
    assert s3.batches() == () and len(s3.migrations) == 1
    assert sub_plan(p, 4) is None


def test_output_prefix_filled_only_for_an_instance_that_missed_outputs():
    h = OutputHistory()
    h.add_request("r", prompt_len=3)
    prefill = IterationPlan(
        1,
        prefills=(
            PrefillBatch(
                1, (0,), (PrefillItem("r", TokenRange(0, 3), 0, (KVKeep(0, (TokenRange(0, 3),)),)),)
            ),
        ),
    )
    sub_plan(prefill, 0, h)
    tokens = [11, 12, 13]
    h.record("r", tokens[0])

    def step(pos, master, instances):
        item = DecodeItem("r", tokens[pos - 3], pos, master, (0,), master)
        return IterationPlan(pos, decodes=(DecodeBatch(pos, instances, (item,)),))

    s = sub_plan(step(3, 0, (0,)), 0, h)  # instance 0 sampled it: knows everything
    assert s.decodes[0].items[0].output_prefix == ()
    h.record("r", tokens[1])
    s = sub_plan(step(4, 0, (0,)), 0, h)
    assert s.decodes[0].items[0].output_prefix == ()
    h.record("r", tokens[2])
    # instance 1 joins at position 5 (input = outputs[2]): it must learn outputs[0:2]
    s1 = sub_plan(step(5, 1, (0, 1)), 1, h)
    assert s1.decodes[0].items[0].output_prefix == (11, 12)
    s0 = sub_plan(step(5, 1, (0, 1)), 0, h)
    assert s0.decodes[0].items[0].output_prefix == ()
    h.forget("r")
    assert not h.seen and "r" not in h.outputs


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


def test_a_new_master_receives_the_request_and_its_earlier_outputs():
    """An instance that joins a request's decode without having prefilled it (a merge or
    scale-up made it master) gets the NewRequest re-sent once, plus the output prefix."""
    req = NewRequest("r", (1, 2, 3), SamplingParams(max_tokens=8))
    h = OutputHistory()
    h.add_request("r", 3, req)
    pre = PrefillBatch(1, (0,), (PrefillItem("r", TokenRange(0, 3), 0, (KVKeep(0, (TokenRange(0, 3),)),)),))
    sub_plan(IterationPlan(1, new_requests=(req,), prefills=(pre,)), 0, h)
    h.record("r", 40)
    h.record("r", 41)
    step = DecodeBatch(2, (0, 1), (DecodeItem("r", 41, 4, master=1, holders=(0,), new_kv_instance=1),))
    p = IterationPlan(2, decodes=(step,))
    s1 = sub_plan(p, 1, h)
    assert s1.new_requests == (req,)
    assert s1.decodes[0].items[0].output_prefix == (40,)
    assert sub_plan(p, 0, h).new_requests == ()  # instance 0 prefilled it
    nxt = IterationPlan(
        3,
        decodes=(
            DecodeBatch(3, (0, 1), (DecodeItem("r", 42, 5, master=1, holders=(0, 1), new_kv_instance=1),)),
        ),
    )
    h.record("r", 42)
    assert sub_plan(nxt, 1, h).new_requests == ()  # sent once


def test_a_re_prefill_on_a_new_ring_resends_the_request_to_instances_that_lack_it():
    """After preemption the scheduler re-prefills over prompt + outputs, possibly on a ring
    of instances that never saw the request: they get the NewRequest (once), the others
    do not (the load test hit 'unknown request' here before)."""
    req = NewRequest("r", (1, 2, 3), SamplingParams(max_tokens=8))
    h = OutputHistory()
    h.add_request("r", 3, req)
    first = PrefillBatch(1, (0,), (PrefillItem("r", TokenRange(0, 3), 0, (KVKeep(0, (TokenRange(0, 3),)),)),))
    assert sub_plan(IterationPlan(1, new_requests=(req,), prefills=(first,)), 0, h).new_requests == (req,)
    h.record("r", 40)
    again = PrefillBatch(
        2,
        (0, 1),
        (PrefillItem("r", TokenRange(0, 4), 1, (KVKeep(1, (TokenRange(0, 4),)),), extra_token_ids=(40,)),),
    )
    p = IterationPlan(2, prefills=(again,))  # no new_requests: the scheduler sent it before
    assert sub_plan(p, 1, h).new_requests == (req,)
    assert sub_plan(p, 0, h).new_requests == ()
    assert sub_plan(IterationPlan(3, prefills=(again,)), 1, h).new_requests == ()  # once


def test_adoptions_go_to_every_instance_holding_the_entry():
    ad = KVAdoption("old", "new", 512, (1, 3), (KVKeep(1, (TokenRange(0, 512),)),))
    p = IterationPlan(9, adoptions=(ad,))
    assert sub_plan(p, 0) is None
    assert sub_plan(p, 1).adoptions == (ad,) and sub_plan(p, 3).adoptions == (ad,)
