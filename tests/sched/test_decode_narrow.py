"""Decode narrowing: a wide decode group gathers its KV onto fewer instances when the
cost model says the steps left pay for the move.

A long prompt prefilled in chunks keeps its KV spread over the chunk ring, so its decode
group starts on every instance. Hand-made arrivals on a fake clock (`fake_clock.run`
checks invariants and every plan)."""

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.model_shape import ModelShape
from esp_core.sched.scheduler import ESPScheduler

from .fake_clock import decode_batches, run
from .fake_clock import prompt_request as req

CHUNKED = dict(chunked_prefill=True, chunk_tokens=2000, short_reserved_instances=0)


def cpu_scheduler(slots: int = 50_000, **cfg) -> ESPScheduler:
    """4 CPU instances serving the built-in model: each instance a step spans beyond
    the first costs ~1 ms per layer, 4 ms a step (`HardwareSpec.cpu`), so a spread
    decode pays to narrow."""
    cost = CostModel.analytical(ModelShape.builtin_tiny(), HardwareSpec.cpu())
    return ESPScheduler(ClusterSpec(4, slots), cost, ESPSchedulerConfig(**CHUNKED, **cfg))


def a800_scheduler(**cfg) -> ESPScheduler:
    return ESPScheduler(
        ClusterSpec(4, 50_000), CostModel.default_a800(), ESPSchedulerConfig(**CHUNKED, **cfg)
    )


def widths(res) -> list[int]:
    """Instances of each decode step that produced tokens, in order."""
    return [
        len({it.master for it in b.items} | {h for it in b.items for h in it.holders})
        for b in decode_batches(res)
    ]


def test_a_spread_long_prompt_decodes_on_one_instance_after_one_move():
    s = cpu_scheduler(narrow_decode_groups=True)
    res = run(s, [(0.0, req("a", 8000, 64, 0.0))], keep_plans=True)
    assert len(res.tokens["a"]) == 64
    assert s.stats["decode_narrowings"] == 1 and s.stats["preemptions"] == 0
    moves = [m for p in res.plans for m in p.migrations]
    assert len({m.dst for m in moves}) == 1  # everything gathered on one instance
    (target,) = {m.dst for m in moves}
    assert sum(len(r) for m in moves for r in m.ranges) == 6000  # the other three's quarter each
    steps = decode_batches(res)
    # the step of the move still spans the instances it leaves (busy until their sends
    # end) but reads and writes only the target; every later step runs on the target alone
    move_plan = next(p for p in res.plans if p.migrations)
    (first,) = move_plan.decodes
    assert len(first.instances) == 4
    assert all(
        it.master == target and it.holders == (target,) and it.new_kv_instance == target for it in first.items
    )
    after = steps[steps.index(first) + 1 :]
    assert after and all(b.instances == (target,) for b in after)
    assert s.kv_free_slots() == [50_000] * 4


def test_without_narrowing_the_decode_spans_the_chunk_ring():
    s = cpu_scheduler()
    res = run(s, [(0.0, req("a", 8000, 64, 0.0))], keep_plans=True)
    assert s.stats["decode_narrowings"] == 0
    assert not [m for p in res.plans for m in p.migrations]
    assert set(widths(res)) == {4}


def test_narrows_only_as_far_as_the_kept_instances_have_room():
    # 4,200 slots each: two instances take the 8,000 tokens plus the 64 to come, one cannot
    s = cpu_scheduler(slots=4200, narrow_decode_groups=True)
    res = run(s, [(0.0, req("a", 8000, 64, 0.0))], keep_plans=True)
    assert len(res.tokens["a"]) == 64
    assert s.stats["decode_narrowings"] == 1 and s.stats["preemptions"] == 0
    assert len({m.dst for p in res.plans for m in p.migrations}) == 2
    assert widths(res)[-1] == 2


def test_no_narrowing_without_room_for_the_tokens_to_come():
    s = cpu_scheduler(slots=2030, narrow_decode_groups=True)  # 2,000 held + 30 free each
    res = run(s, [(0.0, req("a", 8000, 16, 0.0))], keep_plans=True)
    assert len(res.tokens["a"]) == 16
    assert s.stats["decode_narrowings"] == 0 and s.stats["preemptions"] == 0


def test_no_narrowing_when_the_steps_left_do_not_pay_for_the_move():
    s = cpu_scheduler(narrow_decode_groups=True)
    res = run(s, [(0.0, req("a", 8000, 2, 0.0))], keep_plans=True)  # one decode step left
    assert len(res.tokens["a"]) == 2
    assert s.stats["decode_narrowings"] == 0


def test_the_cost_model_keeps_a_long_context_wide_and_narrows_a_short_one():
    # A800: a 40K-token context reads less per step spread over four GPUs than the
    # exchange costs; at 4K the exchange costs more than the read it spreads
    s = a800_scheduler(narrow_decode_groups=True)
    res = run(s, [(0.0, req("long", 40_000, 64, 0.0))], keep_plans=True)
    assert s.stats["decode_narrowings"] == 0 and set(widths(res)) == {4}
    s = a800_scheduler(narrow_decode_groups=True)
    res = run(s, [(0.0, req("short", 4000, 200, 0.0))], keep_plans=True)
    assert s.stats["decode_narrowings"] == 1 and widths(res)[-1] == 1


def test_requests_that_join_later_step_with_the_narrowed_group():
    s = cpu_scheduler(narrow_decode_groups=True, pack_decode=True)
    arrivals = [
        (0.0, req("long", 8000, 120, 0.0)),
        (0.5, req("s1", 40, 30, 0.5)),
        (0.6, req("s2", 60, 30, 0.6)),
    ]
    res = run(s, arrivals, keep_plans=True)
    assert [len(res.tokens[r]) for r in ("long", "s1", "s2")] == [120, 30, 30]
    assert s.stats["decode_narrowings"] == 1 and s.stats["preemptions"] == 0
    assert s.kv_free_slots() == [50_000] * 4
