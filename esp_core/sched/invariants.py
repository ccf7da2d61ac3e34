"""The ESP scheduler's state invariants, checked after every event in tests.

KV accounting consistent and never over-committed; decode groups own disjoint instance
sets that hold all their requests' KV; instances busy exactly with running batches; the
queue holds exactly the waiting and between-chunk requests; the memory check's resident
aggregates match the requests; prefix-cache entries own exactly their KV (cache_ops.py).
"""

from __future__ import annotations

from esp_core.sched.cache_ops import check_cache_invariants
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import Phase


def check_invariants(state: SchedulerState) -> None:
    state.kv.check_invariants()
    _check_groups(state)
    _check_lookaheads(state)
    _check_instances(state)
    _check_requests(state)
    _check_residents(state)
    check_cache_invariants(state)
    if not state.config.short_kv_on_long_holders:
        for i in state.partial_holders():
            assert state.owner[i] is None, f"partial holder {i} owned by group {state.owner[i]}"


def _check_groups(state: SchedulerState) -> None:
    seen: dict[int, int] = {}
    for g in state.groups.values():
        for i in g.instances:
            assert i not in seen, f"instance {i} in groups {seen[i]} and {g.gid}"
            seen[i] = g.gid
            assert state.owner[i] == g.gid, f"owner[{i}] = {state.owner[i]} != {g.gid}"
        for rid in g.requests:
            st = state.requests[rid]
            assert st.phase == Phase.DECODE and st.group == g.gid, (rid, st.phase, st.group)
            holders = set(state.kv.holders(rid))
            assert holders <= g.instances, f"{rid} KV on {holders} outside group {g.instances}"
            # each running step placed its new token's KV (two with a look-ahead step)
            expected = st.kv_len + (st.batch is not None) + (st.earlier_batch is not None)
            assert state.kv.tokens_of(rid) == expected, (
                f"{rid}: {state.kv.tokens_of(rid)} KV tokens, expected {expected}"
            )


def _check_instances(state: SchedulerState) -> None:
    for i, o in enumerate(state.owner):
        assert o is None or i in state.groups[o].instances, f"stale owner of {i}"
    for bid, b in state.running.items():
        for i in b.instances:
            # (an instance running two steps of a group is marked with the later one)
            later = _later_step(state, bid)
            assert state.busy[i] in (bid, later), f"instance {i} of batch {bid} not marked busy"
    for i, busy in enumerate(state.busy):
        assert busy is None or busy in state.running, f"instance {i} busy with finished batch {busy}"


def _later_step(state: SchedulerState, bid: int) -> int | None:
    b = state.running[bid]
    g = state.groups.get(b.group) if b.group is not None else None
    return g.running_batch if g is not None and g.earlier_batch == bid else None


def _check_lookaheads(state: SchedulerState) -> None:
    """Two running steps of a group: both decode steps of it on its one instance, and
    each request of the later one is in the earlier one."""
    for g in state.groups.values():
        if g.earlier_batch is None:
            continue
        assert g.running_batch is not None, g.gid
        early, late = state.running[g.earlier_batch], state.running[g.running_batch]
        assert len(g.instances) == 1 and early.instances == late.instances == tuple(g.instances), g.gid
        assert early.kind == late.kind == "decode" and early.group == late.group == g.gid, g.gid
        assert set(late.requests) <= set(early.requests), g.gid
        for rid in late.requests:
            st = state.requests[rid]
            assert (st.earlier_batch, st.batch) == (early.batch_id, late.batch_id), rid
    for rid, st in state.requests.items():
        if st.earlier_batch is not None:
            assert st.batch is not None and st.earlier_batch in state.running, rid


def _check_requests(state: SchedulerState) -> None:
    waiting = set(state.queue)
    assert len(waiting) == len(state.queue)
    for rid, st in state.requests.items():
        in_q = rid in waiting
        assert in_q == (st.phase in (Phase.WAITING, Phase.PARTIAL)), (rid, st.phase, in_q)
        if st.phase == Phase.DONE:
            assert st.group is None
            if st.batch is None and rid not in state.pending_release:
                assert not state.kv.holders(rid), f"{rid} done but holds KV without release"
    for rid in state.pending_release:
        assert state.requests[rid].phase == Phase.DONE


def _check_residents(state: SchedulerState) -> None:
    resident = {
        rid
        for rid, st in state.requests.items()
        if st.phase in (Phase.PREFILLING, Phase.PARTIAL, Phase.DECODE)
    }
    members = set(state.residents.members)
    assert resident == members, resident ^ members
    for rid in resident:
        st = state.requests[rid]
        assert st.check_remaining == st.remaining, rid
        full = st.kv_len if st.phase == Phase.DECODE else st.prefill_target
        # (a source's positions may become shared after its view was set: counted twice, safe)
        assert full - state.kv.segment_len(rid) <= st.check_len <= full, rid
    assert state.residents.total_len == sum(state.requests[r].check_len for r in resident)
    assert state.residents.remaining_upper_bound >= max(
        (state.requests[r].check_remaining for r in resident), default=0
    )
