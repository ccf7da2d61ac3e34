"""check_plan rejects plans that break the contract (it accepts every plan the scheduler
emits: tests/sched/fake_clock.py runs it on each)."""

import dataclasses

import pytest

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import KVKeep, NewRequest, Release, ReleaseReason, SamplingParams, TokenRange
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
