"""check_plan rejects plans that break the contract (it accepts every plan the scheduler
emits: tests/sched/fake_clock.py runs it on each)."""

import dataclasses

import pytest

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import (
    BatchResult,
    KVKeep,
    NewRequest,
    Release,
    ReleaseReason,
    SampledToken,
    SamplingParams,
    TokenRange,
)
from esp_core.sched.plan_check import PlanError, check_plan, snapshot
from esp_core.sched.scheduler import ESPScheduler


def _first_plan():
    s = ESPScheduler(ClusterSpec(4, 1000), CostModel.default_a800(), ESPSchedulerConfig())
    s.add_request(NewRequest("a", (3,) * 100, SamplingParams(max_tokens=4)), 0.0)
    before = snapshot(s)
    plan = s.schedule(0.0)
    assert len(plan.prefills) == 1
    return plan, before


def _with_item(plan, **changes):
    batch = plan.prefills[0]
    item = dataclasses.replace(batch.items[0], **changes)
    return dataclasses.replace(plan, prefills=(dataclasses.replace(batch, items=(item,)),))


def test_the_scheduler_plan_passes():
    plan, before = _first_plan()
    used = check_plan(plan, before)
    assert sum(used.values()) == 100


def test_keeps_that_do_not_partition_the_tokens_fail():
    plan, before = _first_plan()
    inst = plan.prefills[0].instances[0]
    bad = _with_item(plan, keep=(KVKeep(inst, (TokenRange(0, 99),)),))
    with pytest.raises(PlanError, match="partition"):
        check_plan(bad, before)


def test_keep_outside_the_ring_fails():
    plan, before = _first_plan()
    outside = next(i for i in range(4) if i not in plan.prefills[0].instances)
    bad = _with_item(plan, keep=(KVKeep(outside, (TokenRange(0, 100),)),))
    with pytest.raises(PlanError, match="outside ring"):
        check_plan(bad, before)


def test_sample_flag_must_match_the_end_of_the_sequence():
    plan, before = _first_plan()
    with pytest.raises(PlanError, match="sample"):
        check_plan(_with_item(plan, sample=False), before)


def test_release_of_kv_not_held_fails():
    plan, before = _first_plan()
    bad = dataclasses.replace(plan, releases=(Release("a", (0,), ReleaseReason.FINISHED),))
    with pytest.raises(PlanError, match="release"):
        check_plan(bad, before)


def test_a_batch_on_an_instance_the_request_was_never_sent_to_fails():
    plan, before = _first_plan()
    ring = plan.prefills[0].instances
    bad = dataclasses.replace(plan, joins=(dataclasses.replace(plan.joins[0], instances=ring[1:]),))
    with pytest.raises(PlanError, match="do not know a"):
        check_plan(bad, before)


def test_a_request_without_a_join_or_a_join_without_the_request_fails():
    plan, before = _first_plan()
    with pytest.raises(PlanError, match="joined"):
        check_plan(dataclasses.replace(plan, joins=()), before)
    with pytest.raises(PlanError, match="joined"):
        check_plan(dataclasses.replace(plan, new_requests=()), before)


def _decoding_plan():
    """Request a with three outputs; its next decode step planned (nothing to send)."""
    s = ESPScheduler(ClusterSpec(2, 1000), CostModel.default_a800(), ESPSchedulerConfig())
    s.add_request(NewRequest("a", (3,) * 100, SamplingParams(max_tokens=8)), 0.0)
    for k in range(3):  # the prefill, then two decode steps
        (batch,) = s.schedule(0.1 * k).batches()
        kind = "decode" if k else "prefill"
        s.update(BatchResult(batch.batch_id, kind, batch.instances, (SampledToken("a", 50 + k),)), 0.1 * k)
    before = snapshot(s)
    plan = s.schedule(1.0)
    assert plan.decodes and not plan.joins
    return plan, before


def test_a_decode_step_on_an_instance_that_missed_outputs_needs_their_prefix():
    plan, before = _decoding_plan()
    (batch,) = plan.decodes
    (item,) = batch.items
    known = before.requests["a"].known
    lacking = dataclasses.replace(before.requests["a"], known={i: 0 for i in known})
    stale = dataclasses.replace(before, requests={**before.requests, "a": lacking})
    with pytest.raises(PlanError, match="lack outputs"):
        check_plan(plan, stale)
    with_prefix = dataclasses.replace(item, output_prefix=lacking.outputs[:-1])
    ok = dataclasses.replace(plan, decodes=(dataclasses.replace(batch, items=(with_prefix,)),))
    check_plan(ok, stale)
    wrong = dataclasses.replace(item, output_prefix=(1,) * (len(lacking.outputs) - 1))
    bad = dataclasses.replace(plan, decodes=(dataclasses.replace(batch, items=(wrong,)),))
    with pytest.raises(PlanError, match="output_prefix"):
        check_plan(bad, stale)


def test_sending_a_request_to_an_instance_that_knows_it_fails():
    plan, before = _first_plan()
    again = plan
    known = {i: 0 for i in plan.prefills[0].instances}
    stale = dataclasses.replace(
        before, requests={**before.requests, "a": dataclasses.replace(before.requests["a"], known=known)}
    )
    with pytest.raises(PlanError, match="sent again"):
        check_plan(again, stale)
