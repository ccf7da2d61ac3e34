"""Scheduler components alone, on hand-made states: KV accounting, the memory check and
admission, the scale-down placement, masters, new-token placement, allocation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esp_core.sched.admission import (
    Candidate,
    PeakMemoryCheck,
    admit_fcfs,
)
from esp_core.sched.allocation import GroupView, allocate, compaction_candidates
from esp_core.sched.kv_accounting import KVAccounting, KVOvercommit, subtract_ranges
from esp_core.sched.plan import TokenRange as R
from esp_core.sched.scaling import assign_masters, choose_new_kv_instance, place_keeps
from tests.support.sched_reference import peak_demand_reference

# ------------------------------------------------------------------ KV accounting


def test_kv_place_release_and_invariants():
    kv = KVAccounting(3, 100)
    assert kv.can_place("a", 0, 60)
    kv.place("a", 0, [R(0, 60)])
    kv.place("a", 1, [R(60, 90)])
    assert kv.holders("a") == (0, 1) and kv.tokens_of("a") == 90
    assert not kv.can_place("b", 0, 41)
    with pytest.raises(KVOvercommit):
        kv.place("b", 0, [R(0, 41)])
    with pytest.raises(ValueError):
        kv.place("a", 2, [R(50, 70)])  # positions already held on 0
    kv.place("a", 0, [R(90, 91)])  # decode token appended to instance 0
    assert kv.ranges_on("a", 0) == (R(0, 60), R(90, 91))  # not merged: 60-89 are elsewhere
    assert kv.placement("a") == {0: 61, 1: 30}
    kv.check_invariants()
    assert kv.release("a") == (0, 1)
    assert kv.free_slots() == [100, 100, 100]
    kv.check_invariants()


def test_kv_reservations_are_never_eaten_by_others():
    kv = KVAccounting(2, 100)
    assert kv.can_admit(150)
    kv.admit("long", 150)
    assert not kv.can_admit(51)
    assert kv.can_place("long", 0, 100)  # its own reservation
    assert not kv.can_place("other", 0, 51)  # would leave < 150 for "long"
    assert kv.can_place("other", 0, 50)
    kv.place("long", 0, [R(0, 100)])
    assert kv.reserved("long") == 50 and kv.total_reserved == 50
    kv.place("other", 1, [R(0, 50)])
    assert not kv.can_place("other", 1, 1)
    kv.place("long", 1, [R(100, 150)])
    assert kv.reserved("long") == 0
    kv.check_invariants()


def test_kv_move_and_subtract():
    kv = KVAccounting(2, 100)
    kv.place("a", 0, [R(0, 40)])
    kv.move("a", 0, 1, [R(10, 20)])
    assert kv.ranges_on("a", 0) == (R(0, 10), R(20, 40)) and kv.ranges_on("a", 1) == (R(10, 20),)
    with pytest.raises(ValueError):
        kv.move("a", 0, 1, [R(10, 12)])  # not held on 0 any more
    kv.check_invariants()
    assert subtract_ranges([R(0, 10)], [R(0, 10)]) == []


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(0, 3), st.integers(1, 40), st.booleans()), max_size=40
    )
)
def test_kv_check_then_act_never_overcommits(ops):
    kv = KVAccounting(4, 60)
    nxt = {}
    for rid, inst, n, release in ops:
        if release:
            kv.release(rid)
            nxt.pop(rid, None)
        elif kv.can_place(rid, inst, n):
            start = nxt.get(rid, 0)
            kv.place(rid, inst, [R(start, start + n)])
            nxt[rid] = start + n
        else:
            with pytest.raises(KVOvercommit):
                kv.place(rid, inst, [R(10_000, 10_000 + n)])
        kv.check_invariants()


# ------------------------------------------------------------------ memory check / admission


@settings(max_examples=80, derandomize=True, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(1, 500)), max_size=20),
    st.lists(st.tuples(st.integers(0, 50), st.integers(1, 500)), min_size=1, max_size=8),
)
def test_peak_check_matches_the_formula(resident, cands):
    rem = [r for r, _ in resident]
    cur = [c for _, c in resident]
    check = PeakMemoryCheck(rem, cur, capacity=10**9)
    for r, c in cands:
        assert check.peak_with(r, c) == peak_demand_reference(rem + [r], cur + [c])
        check.add(r, c)
        rem.append(r)
        cur.append(c)
        assert check.peak == peak_demand_reference(rem, cur)


def test_peak_check_worked_example():
    # remaining 10 / 5, lengths 100 / 200: peaks 10*1+100 = 110 and 5*2+300 = 310
    assert peak_demand_reference([10, 5], [100, 200]) == 310
    check = PeakMemoryCheck([10], [100], capacity=310)
    assert check.fits(5, 200) and not check.fits(5, 201)


def _cands(*specs):
    return [Candidate(rid, length, rem, passed) for rid, length, rem, passed in specs]


def test_admit_fcfs_with_bounded_skip_ahead():
    q = _cands(("a", 50, 10, 0), ("big", 900, 10, 0), ("b", 50, 10, 0), ("c", 50, 10, 0))
    kw = dict(max_requests=10, max_scan=100)
    # strict FCFS: stops at the first request that does not fit
    r = admit_fcfs(q, PeakMemoryCheck([], [], 10_000), room=500, max_skip_ahead=0, **kw)
    assert r.admitted == ("a",) and r.blocked == ("big",)
    # skip-ahead 1: only one request may pass "big"
    r = admit_fcfs(q, PeakMemoryCheck([], [], 10_000), room=500, max_skip_ahead=1, **kw)
    assert r.admitted == ("a", "b") and dict(r.passed) == {"big": 1}
    # a request already passed once cannot be passed again with limit 1
    q2 = _cands(("big", 900, 10, 1), ("b", 50, 10, 0))
    r = admit_fcfs(q2, PeakMemoryCheck([], [], 10_000), room=500, max_skip_ahead=1, **kw)
    assert r.admitted == ()


def test_admission_time_budget_and_request_cap():
    q = _cands(*[(f"r{i}", 100, 5, 0) for i in range(10)])
    r = admit_fcfs(
        q,
        PeakMemoryCheck([], [], 10**6),
        room=10**6,
        max_skip_ahead=4,
        max_requests=10,
        max_scan=100,
        time_fn=lambda s1, s2: s1 / 1000.0,
        max_time_s=0.35,
    )
    assert r.admitted == ("r0", "r1", "r2")
    r = admit_fcfs(
        q, PeakMemoryCheck([], [], 10**6), room=10**6, max_skip_ahead=4, max_requests=2, max_scan=100
    )
    assert len(r.admitted) == 2
    # the first request always goes, even over budget
    r = admit_fcfs(
        q[:1],
        PeakMemoryCheck([], [], 10**6),
        room=10**6,
        max_skip_ahead=4,
        max_requests=2,
        max_scan=100,
        time_fn=lambda *a: 99.0,
        max_time_s=1.0,
    )
    assert r.admitted == ("r0",)


# ------------------------------------------------------------------ scale-down placement


def test_small_request_goes_whole_to_the_fullest_instance_with_room():
    free = np.array([500, 120, 300, 50])
    keeps = place_keeps(R(0, 100), [0, 1, 2, 3], free, headroom=10)
    assert keeps == (keeps[0],) and keeps[0].instance == 1  # 120 >= 110, the fullest
    assert free.tolist() == [500, 20, 300, 50]


def test_large_request_is_split_over_the_emptiest_instances():
    free = np.array([500, 120, 300, 50])
    keeps = place_keeps(R(0, 700), [0, 1, 2, 3], free, headroom=10)
    assert [k.instance for k in keeps] == [0, 2]
    assert keeps[0].ranges == (R(0, 490),) and keeps[1].ranges == (R(490, 700),)
    assert place_keeps(R(0, 10_000), [0, 1], free) is None
    # only the allowed candidates are used
    free = np.array([500, 120, 300, 50])
    keeps = place_keeps(R(200, 300), [3, 2], free)
    assert {k.instance for k in keeps} <= {2, 3}


def test_prefer_keeps_a_chunk_on_its_holders():
    free = np.array([1000, 150, 1000])
    keeps = place_keeps(R(100, 200), [0, 1, 2], free, prefer=[1])
    assert keeps[0].instance == 1


def test_masters_are_spread_and_prefer_holders():
    held = [{0: 100}, {0: 50, 1: 60}, {0: 10}, {0: 10}]
    masters = assign_masters(held, [0, 1])
    assert masters.count(0) == 2 and masters.count(1) == 2
    assert masters[0] == 0 and masters[1] == 1


def test_new_token_placement_order():
    free = np.array([0, 5, 9])
    assert choose_new_kv_instance(1, {1: 3}, [0, 1, 2], free) == 1  # master has room
    assert choose_new_kv_instance(0, {0: 3, 1: 3}, [0, 1, 2], free) == 1  # holder with room
    assert choose_new_kv_instance(0, {0: 3}, [0, 1, 2], free) == 2  # any instance, most room
    assert choose_new_kv_instance(0, {0: 3}, [0], free) is None  # must scale up


# ------------------------------------------------------------------ allocation


def _alloc(
    groups, free_instances=(), free_room=0, wait=1.0, gain=True, migrate=True, t_mig=lambda n: 1e-5 * n
):
    return allocate(
        free_instances=list(free_instances),
        free_room=free_room,
        groups=groups,
        need_tokens=1000,
        num_new=4,
        prefill_time=lambda d: 8.0 / d,
        wait_alt_s=wait,
        gain_vs_delay=gain,
        allow_migration=migrate,
        migration_time=t_mig,
    )


def test_idle_instances_suffice_no_borrow_of_a_busy_batch():
    g = GroupView(1, (2, 3), num_requests=100, free_slots=(5000, 5000), kv_tokens=(1, 1))
    a = _alloc([g], free_instances=[0, 1], free_room=10_000, migrate=False)
    assert a.instances == [0, 1] and not a.paused_groups
    # a small group: pausing 1 request for 2 s saves 4 requests 2 s each -> borrow
    small = GroupView(1, (2, 3), num_requests=1, free_slots=(5000, 5000), kv_tokens=(1, 1))
    a = _alloc([small], free_instances=[0, 1], free_room=10_000, migrate=False)
    assert a.instances == [0, 1, 2, 3] and a.paused_groups == [1]


def test_no_idle_instance_borrows_when_waiting_is_worse():
    # 4 new requests; pausing 10 decodes for the prefill (T = 8 s / 2 = 4 s) costs 40
    # request-seconds; the gain is 4 x (wait + 8 s on one instance later - 4 s)
    g = GroupView(1, (0, 1), num_requests=10, free_slots=(5000, 5000), kv_tokens=(100, 100))
    a = _alloc([g], wait=100.0, migrate=False)
    assert a.paused_groups == [1]
    a = _alloc([g], wait=0.01, migrate=False)  # instances free up almost now: wait
    assert not a.instances
    # without the gain rule, borrow exactly when needed to fit
    a = _alloc([g], wait=0.01, gain=False, migrate=False)
    assert a.paused_groups == [1]


def test_migration_is_chosen_when_cheaper_than_a_pause():
    g = GroupView(
        1, (0, 1, 2, 3), num_requests=50, free_slots=(9000, 9000, 9000, 9000), kv_tokens=(1000, 10, 10, 10)
    )
    assert compaction_candidates(g, 16) == (1, 2, 3)
    a = _alloc([g], wait=100.0)
    assert a.compacted == {1: (1, 2, 3)} and not a.paused_groups
    assert set(a.instances) == {1, 2, 3}
    # a slow link makes the copy dearer than the pause
    a = _alloc([g], wait=100.0, t_mig=lambda n: 10.0)
    assert a.paused_groups == [1] and not a.compacted
