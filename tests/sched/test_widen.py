"""A chunked prompt's ring widens between chunks, its cached KV migrated (widen.py).

Scene (as in test_ring_lookahead): two short requests decode on instances 0 and 1, long
prompt `a` runs whole on 2 and 3; `s1` finishes first, so long prompt `b` starts alone
on instance 1, chunked (its KV does not fit one instance). When `a` ends, instances 2
and 3 idle while `b` still has most of its chunks left. On the fake clock every plan is
checked (`check_plan`) and the invariants hold."""

from esp_core.sched.plan import TokenRange
from esp_core.sched.widen import migrations_time, plan_widening, rebalance, remaining_chunks_time

from .fake_clock import chunked_a800_scheduler, prefill_by_tokens_step_time, prompt_request, run

SCENE = [
    (0.0, prompt_request("s0", 50, 400, 0.0)),
    (0.0, prompt_request("s1", 50, 20, 0.0)),
    (0.001, prompt_request("a", 60_000, 2, 0.001)),
    (0.01, prompt_request("b", 60_000, 2, 0.01)),
]


def run_scene(arrivals=SCENE, **cfg):
    s = chunked_a800_scheduler(short_reserved_instances=0, **cfg)
    res = run(s, arrivals, keep_plans=True, step_time=prefill_by_tokens_step_time)
    return s, res


def chunks_of(res, rid):
    """(plan, batch, item) of every prefill of `rid`, in plan order."""
    return [(p, b, it) for p in res.plans for b in p.prefills for it in b.items if it.request_id == rid]


def test_without_the_switch_b_keeps_its_first_holder():
    s, res = run_scene(widen_chunk_ring=False)
    chunks = chunks_of(res, "b")
    assert chunks[0][1].instances == (1,)
    assert not [m for p in res.plans for m in p.migrations]
    # b's ring grows only when instance 1 is full (50K slots), never before
    assert all(b.instances == (1,) for _, b, it in chunks if it.tokens.end <= 48_000)
    assert s.stats.get("ring_widenings", 0) == 0


def test_b_widens_onto_the_instances_a_leaves():
    s, res = run_scene(widen_chunk_ring=True)
    chunks = chunks_of(res, "b")
    assert chunks[0][1].instances == (1,)
    widened = [(p, b, it) for p, b, it in chunks if p.migrations]
    assert s.stats["ring_widenings"] == len(widened) >= 1
    plan, batch, item = widened[0]
    # the KV moves off b's holder onto the new instances, in the plan of the wider chunk
    assert {m.request_id for m in plan.migrations} == {"b"}
    assert {m.src for m in plan.migrations} == {1}
    new = {m.dst for m in plan.migrations}
    assert new <= {2, 3} and set(batch.instances) == {1} | new
    assert set(item.cached_holders) == {1} | new
    # rebalanced: every holder of the cached prefix has an equal share, up to a token
    moved = {i: sum(len(r) for m in plan.migrations if m.dst == i for r in m.ranges) for i in new}
    kept = item.tokens.start - sum(moved.values())
    assert max(kept, *moved.values()) - min(kept, *moved.values()) <= 1
    # later chunks run on the wider ring, and b ends sooner than without the switch
    assert all(set(b.instances) >= {1} | new for _, b, _ in chunks[chunks.index(widened[0]) :])
    _, narrow = run_scene(widen_chunk_ring=False)
    assert res.first_token_time["b"] < narrow.first_token_time["b"]
    assert len(res.tokens["b"]) == 2 and len(res.tokens["s0"]) == 400


def test_no_widening_while_another_long_prompt_waits_to_start():
    # c is queued: the idle instances start it (no migration) instead of widening b
    arrivals = [*SCENE, (0.01, prompt_request("c", 60_000, 2, 0.01))]
    s, res = run_scene(arrivals, widen_chunk_ring=True)
    c_start = min(p.plan_id for p, _, it in chunks_of(res, "c") if it.tokens.start == 0)
    assert not [p for p in res.plans if p.migrations and p.plan_id <= c_start]
    assert len(res.tokens["c"]) == 2 and len(res.tokens["b"]) == 2


def held_prompt(cached: int, prompt: int = 60_000, **cfg):
    """A scheduler whose prompt `p` has its first `cached` tokens' KV on instance 1."""
    sched = chunked_a800_scheduler(short_reserved_instances=0, widen_chunk_ring=True, **cfg)
    sched.add_request(prompt_request("p", prompt, 2, 0.0), 0.0)
    state = sched.state
    state.kv.admit("p", prompt)
    state.kv.place("p", 1, (TokenRange(0, cached),))
    p = state.requests["p"]
    p.prefilled = cached
    return state, p


def test_widens_when_migration_plus_the_wider_chunks_beat_staying():
    state, p = held_prompt(30_000)
    w = plan_widening(state, p, (1,), [2, 3])
    assert w is not None and w.holders == (1, 2, 3)
    assert sum(len(r) for m in w.migrations for r in m.ranges) == 20_000
    assert {(m.src, m.dst) for m in w.migrations} == {(1, 2), (1, 3)}
    # both moves leave instance 1: one after the other
    one = state.cost.migration_time(10_000, tp=state.tp)
    assert abs(w.delay_s - 2 * one) < 1e-12
    assert w.time_s == w.delay_s + remaining_chunks_time(state, p, [10_000] * 3) < w.time_narrow_s
    assert w.time_narrow_s == remaining_chunks_time(state, p, [30_000], [20_000 - 16])


def test_no_widening_when_the_move_costs_more_than_it_saves():
    # 100 tokens left: moving 27K tokens of KV costs more than the attention it spreads
    state, p = held_prompt(40_000, prompt=40_100)
    assert plan_widening(state, p, (1,), [2, 3]) is None
    moves = rebalance(state, "p", {1: 40_000}, (1, 2, 3))
    assert moves is not None  # (room enough: only the cost model says no)
    wide = migrations_time(state, moves) + remaining_chunks_time(state, p, [13_334] * 3)
    assert wide >= remaining_chunks_time(state, p, [40_000])


def test_no_widening_onto_an_instance_without_room_for_its_share():
    state, p = held_prompt(30_000)
    state.kv.admit("x", 45_000)
    state.kv.place("x", 2, (TokenRange(0, 45_000),))  # 5K free: less than 10K + 10K to come
    w = plan_widening(state, p, (1,), [2])
    assert w is None


def test_uneven_cached_kv_is_charged_on_its_fullest_holder():
    state, p = held_prompt(30_000)
    even = remaining_chunks_time(state, p, [15_000, 15_000])
    uneven = remaining_chunks_time(state, p, [25_000, 5_000])
    assert uneven > even
    # the fullest holder has no room left: the later chunks' KV all goes to the other,
    # so the fullest stays at 25K (the other outgrows it only near the end)
    full = remaining_chunks_time(state, p, [25_000, 5_000], [0, 45_000])
    assert even < full < uneven


def test_uneven_holders_are_evened_out_without_new_instances():
    # 25K + 5K cached on holders 1 and 2 and no idle instance: 10K move from 1 to 2
    state, p = held_prompt(25_000)
    state.kv.place("p", 2, (TokenRange(25_000, 30_000),))
    p.prefilled = 30_000
    w = plan_widening(state, p, (1, 2), [])
    assert w is not None and w.holders == (1, 2) and w.stat == "kv_rebalances"
    assert [(m.src, m.dst, m.ranges) for m in w.migrations] == [(1, 2, (TokenRange(15_000, 25_000),))]
    assert w.time_narrow_s == remaining_chunks_time(state, p, [25_000, 5_000], [25_000 - 16, 45_000 - 16])
    # already even: nothing to move
    state.kv.move("p", 1, 2, w.migrations[0].ranges)
    assert plan_widening(state, p, (1, 2), []) is None
