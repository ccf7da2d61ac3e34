"""Decode look-ahead (esp_core/sched/lookahead.py): a one-instance group's next step is
planned while its current step runs, only when nothing else wants the instance; a
request that finishes at the running step drops the look-ahead's token and gets its KV
back after the look-ahead step. Every plan is checked against the state it was planned
from, and the invariants after every event."""

from __future__ import annotations

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec, FinishReason
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    IterationPlan,
    NewRequest,
    SampledToken,
    SamplingParams,
)
from esp_core.sched.plan_check import check_plan, snapshot
from esp_core.sched.prefix_cache import block_hash_chain
from esp_core.sched.scheduler import ESPScheduler

EOS = 2


class Driver:
    """The controller's side by hand: plan (checked), then complete batches one by one."""

    def __init__(self, num_instances: int = 1, slots: int = 1000, **cfg) -> None:
        config = ESPSchedulerConfig(eos_token_ids=(EOS,), decode_lookahead=True, **cfg)
        self.s = ESPScheduler(ClusterSpec(num_instances, slots), CostModel.default_a800(), config)
        self.now = 0.0
        self.events: list = []

    def add(
        self, rid: str, prompt_len: int, max_tokens: int = 20, hashes: tuple[int, ...] = (), **sampling
    ) -> None:
        sp = SamplingParams(max_tokens=max_tokens, **sampling)
        ids = tuple(range(3, 3 + prompt_len))
        self.s.add_request(NewRequest(rid, ids, sp, self.now, block_hashes=hashes), self.now)

    def plan(self) -> IterationPlan:
        before = snapshot(self.s)
        plan = self.s.schedule(self.now)
        check_plan(plan, before)
        self.s.check_invariants()
        return plan

    def complete(self, batch, tokens: dict[str, int]) -> list:
        self.now += 0.01
        sampled = tuple(SampledToken(it.request_id, tokens.get(it.request_id, 100)) for it in batch.items)
        kind = "decode" if isinstance(batch, DecodeBatch) else "prefill"
        events = self.s.update(BatchResult(batch.batch_id, kind, batch.instances, sampled), self.now)
        self.s.check_invariants()
        self.events += events
        return events

    def pipelined(self) -> tuple[DecodeBatch, DecodeBatch]:
        """The next decode step and, the scheduler asked again at once, its look-ahead."""
        step = only_decode(self.plan())
        return step, only_decode(self.plan())

    def prefill(self, first_tokens: dict[str, int] | None = None) -> None:
        """Plan and complete the prefill of every waiting request (one plan)."""
        plan = self.plan()
        assert plan.prefills and not plan.decodes
        for b in plan.prefills:
            self.complete(b, first_tokens or {})


def only_decode(plan: IterationPlan) -> DecodeBatch:
    assert len(plan.decodes) == 1 and not plan.prefills, plan
    return plan.decodes[0]


def test_lookahead_step_follows_the_running_step_on_its_instance():
    d = Driver()
    d.add("a", 10)
    d.add("b", 5)
    d.prefill({"a": 50, "b": 60})
    step = only_decode(d.plan())
    assert [it.input_token for it in step.items] == [50, 60]
    ahead = only_decode(d.plan())  # the controller asks again at once
    assert ahead.is_lookahead and ahead.instances == step.instances
    by_rid = {it.request_id: it for it in step.items}
    for it in ahead.items:
        assert it.input_token is None
        assert it.position == by_rid[it.request_id].position + 1
        assert it.master == it.new_kv_instance == step.instances[0]
        assert it.holders == step.instances
    assert d.s.kv.tokens_of("a") == 10 + 2  # prompt + both running steps' new tokens
    assert d.plan().is_empty  # at most two steps in flight
    d.complete(step, {"a": 51, "b": 61})
    nxt = only_decode(d.plan())  # the step after the look-ahead, again ahead
    assert nxt.is_lookahead and [it.position for it in nxt.items] == [it.position + 1 for it in ahead.items]
    d.complete(ahead, {"a": 52, "b": 62})
    assert d.s.output_ids("a") == [50, 51, 52] and d.s.output_ids("b") == [60, 61, 62]


def test_off_by_default():
    d = Driver()
    config = ESPSchedulerConfig(eos_token_ids=(EOS,))
    assert not config.decode_lookahead
    d.s = ESPScheduler(ClusterSpec(1, 1000), CostModel.default_a800(), config)
    d.add("a", 10)
    d.prefill()
    only_decode(d.plan())
    assert d.plan().is_empty


def test_no_lookahead_while_a_request_waits():
    d = Driver()
    d.add("a", 10)
    d.prefill()
    only_decode(d.plan())
    d.add("late", 10)  # the only instance is busy: it waits in the queue
    assert d.plan().is_empty


def test_no_lookahead_for_a_group_on_two_instances():
    d = Driver(num_instances=2, slots=100, headroom_tokens=0)
    d.add("a", 150, max_tokens=10)  # its KV cannot fit one instance
    d.prefill()
    step = only_decode(d.plan())
    assert len(step.instances) == 2
    assert d.plan().is_empty


def test_no_lookahead_when_the_running_step_may_be_the_last():
    d = Driver()
    d.add("a", 10, max_tokens=2)  # prefill: output 1, the step: output 2 (the last)
    d.prefill()
    step = only_decode(d.plan())
    assert d.plan().is_empty
    events = d.complete(step, {"a": 51})
    assert events[-1].finish_reason == FinishReason.LENGTH
    d.plan()  # releases its KV
    assert d.s.kv_free_slots() == [1000]


def test_lookahead_stops_at_the_last_output():
    d = Driver()
    d.add("a", 10, max_tokens=4)
    d.prefill()  # output 1
    step, ahead = d.pipelined()  # outputs 2 and 3
    assert ahead.is_lookahead
    d.complete(step, {"a": 51})
    last = only_decode(d.plan())  # output 4, after output 3 (not the last): ahead too
    assert last.is_lookahead and last.items[0].position == 12
    d.complete(ahead, {"a": 52})
    assert d.plan().is_empty  # the running step's output is the last: nothing after it
    events = d.complete(last, {"a": 53})
    assert events[-1].finish_reason == FinishReason.LENGTH and events[-1].token.token_id == 53
    d.plan()
    assert d.s.kv_free_slots() == [1000] and not d.s.has_unfinished()


def test_no_lookahead_without_a_free_slot_on_the_instance():
    d = Driver(num_instances=2, slots=13, headroom_tokens=0)
    d.add("a", 12, max_tokens=10)
    d.prefill()
    step = only_decode(d.plan())
    (inst,) = step.instances
    assert d.s.kv.free[inst] == 0  # its step took the last slot there
    assert d.plan().is_empty  # the next step must scale up: no look-ahead


def test_finish_at_the_running_step_drops_the_lookahead_token_and_frees_kv_after_it():
    d = Driver()
    d.add("a", 10)
    d.add("b", 5)
    d.prefill()
    step, ahead = d.pipelined()
    events = d.complete(step, {"a": EOS, "b": 61})  # a stops at the running step
    assert [(e.request_id, e.finish_reason) for e in events] == [("a", FinishReason.STOP), ("b", None)]
    plan = d.plan()  # a's KV waits for the look-ahead step: no release, no new look-ahead
    assert not plan.releases and plan.is_empty
    assert d.s.kv.tokens_of("a") == 12
    events = d.complete(ahead, {"a": 99, "b": 62})
    assert [(e.request_id, e.token.token_id) for e in events] == [("b", 62)]  # a's token dropped
    plan = d.plan()
    assert [r.request_id for r in plan.releases] == ["a"]
    assert [it.request_id for it in only_decode(plan).items] == ["b"]
    assert d.s.kv.tokens_of("a") == 0 and "a" not in d.s.requests


def test_abort_during_the_running_step_frees_kv_after_the_lookahead_step():
    d = Driver()
    d.add("a", 10)
    d.prefill()
    step, ahead = d.pipelined()
    assert [e.finish_reason for e in d.s.abort_request("a", d.now)] == [FinishReason.ABORT]
    d.s.check_invariants()
    assert d.complete(step, {"a": 51}) == []
    assert d.plan().is_empty  # still running the look-ahead step
    assert d.complete(ahead, {"a": 52}) == []
    plan = d.plan()
    assert [r.request_id for r in plan.releases] == ["a"] and not plan.decodes
    assert d.s.kv_free_slots() == [1000] and not d.s.has_unfinished()


def test_a_request_aborted_before_the_lookahead_blocks_it_until_its_release():
    d = Driver()
    d.add("a", 10)
    d.add("b", 5)
    d.prefill()
    step = only_decode(d.plan())
    d.s.abort_request("b", d.now)
    assert d.plan().is_empty  # b's KV waits for the running step: no look-ahead
    d.complete(step, {"a": 51, "b": 61})
    plan = d.plan()
    assert [r.request_id for r in plan.releases] == ["b"]
    assert not only_decode(plan).is_lookahead
    assert only_decode(d.plan()).is_lookahead  # and then the pipeline fills again


def test_failed_running_step_fails_its_requests_and_the_lookahead_releases_after():
    d = Driver()
    d.add("a", 10)
    d.prefill()
    step, ahead = d.pipelined()
    events = d.s.update(BatchResult(step.batch_id, "decode", step.instances, error="boom"), d.now)
    d.s.check_invariants()
    assert [e.finish_reason for e in events] == [FinishReason.ERROR]
    assert d.plan().is_empty
    events = d.s.update(BatchResult(ahead.batch_id, "decode", ahead.instances, error="no input"), d.now)
    d.s.check_invariants()
    assert events == []
    d.plan()
    assert d.s.kv_free_slots() == [1000] and not d.s.has_unfinished()


def test_eos_during_a_lookahead_still_leaves_a_prefix_cache_entry():
    """A chat turn that stops at EOS while its look-ahead step runs is kept for the next
    turn, as without the look-ahead, its entry covering prompt + every output."""
    block = 4
    d = Driver(chunked_prefill=True, chunk_tokens=2048, prefix_cache=True, prefix_block_tokens=block)
    ids = tuple(range(3, 3 + 8))
    d.add("a", 8, hashes=block_hash_chain(ids, block))
    d.prefill({"a": 50})
    step, ahead = d.pipelined()
    d.complete(step, {"a": 51})
    second = only_decode(d.plan())  # a look-ahead again, behind `ahead`
    d.complete(ahead, {"a": EOS})  # a stops: outputs 50, 51, EOS
    d.complete(second, {"a": 99})  # its token dropped; the KV stays as an entry
    plan = d.plan()
    assert not plan.releases and plan.is_empty
    assert d.s.prefix_cache_stats()["entries"] == 1
    assert d.s.cached_kv_per_instance() == [8 + 3]  # prompt + 50, 51, EOS
    assert not d.s.has_unfinished()
