"""Chunked prefill of long prompts, and short-request isolation around it.

A long prompt (more than `chunk_tokens` to prefill) goes chunk by chunk: each chunk runs
on a ring made of the prompt's current KV holders plus idle instances, attends to the
cached prefix on the holders, and keeps its own KV (spread evenly over the ring by
default). Between chunks the request is PARTIAL and its holders hold no other prefill.

Short-request isolation: while short requests keep arriving, chunk rings stay off the
last `short_reserved_instances` instances, so a short request finds an instance no long
prefill holds; when a chunk must still take them (its KV needs the room), the chunk is
cut so the cost model says it ends within `short_wait_budget_s`.

An aged long prompt (waiting longer than `long_request_max_wait_s`) goes before the short
requests' round, and its holders are drained (`claim_holders`) until it can run.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.placement import group_by_node
from esp_core.sched.plan import KVKeep, TokenRange
from esp_core.sched.prefill import prefill_item, record_pause, start_prefill
from esp_core.sched.reserved_budget import budget_mode_instances, may_start_on_reserved
from esp_core.sched.ring_lookahead import other_long_waiting, should_wait_for_wider_ring
from esp_core.sched.scaling import place_keeps, spread_keeps
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import Phase, SchedulerRequest
from esp_core.sched.widen import Widening, apply_widening, plan_widening, undo_widening


def try_chunk(
    state: SchedulerState, plan: PlanBuilder, st: SchedulerRequest, unstarted: list[SchedulerRequest]
) -> None:
    """`plan_chunk`, with a first chunk not planned ahead of an earlier long prompt that
    has been passed `max_skip_ahead` times (`unstarted`: long prompts that could not
    start in this call, in queue order)."""
    # (admitted already -- its whole prompt reserved -- counts as started: blocking it
    # could leave its reservation in the way of the request it waits for)
    first = st.phase == Phase.WAITING and not state.kv.holders(st.rid) and not state.kv.reserved(st.rid)
    if first and any(u.times_passed >= state.config.max_skip_ahead for u in unstarted):
        return
    plan_chunk(state, plan, st)
    if not first:
        return
    if st.phase == Phase.WAITING:
        unstarted.append(st)
    else:
        for u in unstarted:
            u.times_passed += 1


def claim_holders(state: SchedulerState, plan: PlanBuilder, st: SchedulerRequest) -> None:
    """An aged chunked request waits for its holders: start no new prefill there and no
    further steps of the decode groups on them, so that they drain (a ring needs all
    its instances idle at once, which a stream of short work may never leave). Only
    when running work blocks it (that work's completion comes back as an event)."""
    holders = state.kv.holders(st.rid)
    owners = {o for i in holders if (o := state.owner[i]) is not None}
    if any(state.busy[i] is not None for i in holders) or any(not state.groups[o].ready for o in owners):
        plan.taken.update(holders)
        plan.drained_for_chunk.update(holders)


def long_instances(state: SchedulerState, plan: PlanBuilder) -> set[int]:
    """Instances a long (chunked) prompt occupies: its holders between chunks and the
    rings of running chunks."""
    out = plan.partial_holders(state)
    for b in state.running.values():
        if b.chunk:
            out.update(b.instances)
    return out


def long_instance_cap(state: SchedulerState, now: float, budget: bool = False) -> int:
    """How many instances long prompts' chunks may occupy now: all, or all but
    `short_reserved_instances` while short requests are arriving. `budget`: beyond how
    many a chunk is cut to `short_wait_budget_s` -- while shorts arrive, as soon as no
    instance is left free of long prompts (also with no reserved instance)."""
    cfg, n = state.config, state.cluster.num_instances
    if now - state.last_short_arrival <= cfg.short_activity_window_s:
        reserved = max(cfg.short_reserved_instances, 1 if budget else 0)
        return max(n - reserved, 1)
    return n


def plan_chunk(state: SchedulerState, plan: PlanBuilder, st: SchedulerRequest) -> None:
    """Plan the next chunk of a chunked request on its holders plus idle instances."""
    holders = state.kv.holders(st.rid)
    borrow = _borrowable_holder_groups(state, plan, holders)
    if borrow is None:
        return
    others_budget = budget_mode_instances(state, exclude=st)
    extra, num_within, longs, partial = _ring_candidates(state, plan, holders, others_budget)
    on_reserved = False
    if not holders and not num_within:
        if not may_start_on_reserved(state, len(extra)):
            return
        on_reserved, num_within = True, 1
    if not holders and not on_reserved:
        state.budget_longs.discard(st.rid)  # (a restart after a preemption)
        if should_wait_for_wider_ring(state, st, num_within, plan.now, long_instance_cap(state, plan.now)):
            return
    start = st.prefilled
    end = min(start + state.config.chunk_tokens, st.prefill_target)
    admitted_now = start == 0 and not state.kv.reserved(st.rid)
    if admitted_now and not _reserve_prompt(state, st):
        return
    if not holders and not on_reserved and _whole_prompt_allowed(state, st):
        whole = _whole_prompt_ring(state, st, extra[:num_within], partial)
        if whole is not None:
            state.stats["whole_prompt_chunks"] += 1
            _emit_chunk(state, plan, st, TokenRange(start, st.prefill_target), *whole, 0, borrow)
            return
    widened = _widen(state, plan, st, holders, extra[:num_within], longs - others_budget)
    if widened is not None:
        holders = widened.holders
        extra = [i for i in extra if i not in holders]
    found = _chunk_ring(state, st, TokenRange(start, end), holders, extra, num_within, partial)
    if found is None:
        if admitted_now:  # not started: its reservation must not block others
            state.kv.unreserve(st.rid)
        if widened is not None:
            undo_widening(state, plan.migrations, widened)
        return
    ring, keeps, free = found
    if on_reserved:
        state.budget_longs.add(st.rid)
    if len((longs - others_budget) | set(ring)) > long_instance_cap(state, plan.now, budget=True):
        # the chunk takes the shorts' instances too: keep it short
        cut = _budget_chunk(state, start, end, len(ring), len(holders))
        if cut < end:
            end = cut
            state.stats["budget_chunks"] += 1
            cut_keeps = _chunk_keeps(state, TokenRange(start, end), ring, free.copy(), holders)
            assert cut_keeps is not None, "a shorter chunk fits where the longer one did"
            keeps = cut_keeps
    delay = 0.0 if widened is None else widened.delay_s
    _emit_chunk(state, plan, st, TokenRange(start, end), ring, keeps, len(holders), borrow, delay)


def _widen(
    state: SchedulerState,
    plan: PlanBuilder,
    st: SchedulerRequest,
    holders: tuple[int, ...],
    within: list[int],
    counted: set[int],
) -> Widening | None:
    """widen.py: the ring of `st`'s next chunk (`holders`, not empty) widened onto idle
    instances inside the long prompts' cap (`within`; `counted`: instances counted
    against it), no more than the cap of a budget cut allows (the chunk stays whole),
    its KV moved in the accounting and the moves added to the plan; None when not."""
    if not state.config.widen_chunk_ring or not holders or st.rid in state.budget_longs:
        return None
    room = long_instance_cap(state, plan.now, budget=True) - len(counted)
    # (other prompts' holders are idle between their chunks, and counted: left out)
    candidates = [i for i in within if i not in counted][: max(room, 0)]
    w = plan_widening(state, st, holders, candidates)
    if w is not None:
        apply_widening(state, plan.migrations, w)
    return w


def _whole_prompt_allowed(state: SchedulerState, st: SchedulerRequest) -> bool:
    """Adaptive chunking: a long prompt not yet started is prefilled whole (one chunk)
    when no short request waits for a prefill -- chunks exist to let shorts in between,
    and without them a prompt's holders would be fixed by its first chunk alone."""
    return state.config.adaptive_chunking and not st.prefilled and not state.short_waiting()


def _whole_prompt_ring(
    state: SchedulerState, st: SchedulerRequest, within: list[int], partial: set[int]
) -> tuple[tuple[int, ...], tuple[KVKeep, ...]] | None:
    """The time-optimal ring for the whole prompt among `within` (idle instances inside
    the long prompts' cap, best first) that can keep its KV, packed as a whole prompt's
    is (no later chunk attends to it); None when none of them can."""
    tokens = TokenRange(0, st.prefill_target)
    n = len(tokens)
    free = state.kv.free.copy()
    for i in partial:
        free[i] = 0
    dops = range(1, len(within) + 1)
    if state.config.backlog_min_ring and other_long_waiting(state, st):
        # other long prompts wait for instances: the fewest instance-seconds (a ring's
        # exchange is not free), leaving the other idle instances to them
        order = sorted(dops, key=lambda d: (d * _chunk_time(state, n, 0, d, 0), d))
    else:
        order = sorted(dops, key=lambda d: (_chunk_time(state, n, 0, d, 0), d))
    for dop in order:
        ring = tuple(within[:dop])
        keeps = place_keeps(tokens, ring, free.copy(), headroom=state.config.headroom_tokens)
        if keeps is not None and all(state.kv.can_place(st.rid, k.instance, k.num_tokens) for k in keeps):
            return ring, keeps
    return None


def _borrowable_holder_groups(
    state: SchedulerState, plan: PlanBuilder, holders: Sequence[int]
) -> set[int] | None:
    """Decode groups (of short requests) on the holders, paused for the chunk; None
    when a holder is busy or taken, or its group may not be paused now."""
    borrow: set[int] = set()
    for i in holders:
        if state.busy[i] is not None or i in plan.taken:
            return None
        owner = state.owner[i]
        if owner is not None:
            g = state.groups[owner]
            if not (
                state.config.short_kv_on_long_holders
                and g.ready
                and g.steps_since_borrow >= 1
                and all(state.busy[j] is None and j not in plan.taken for j in g.instances)
            ):
                return None
            borrow.add(g.gid)
    return borrow


def _ring_candidates(
    state: SchedulerState, plan: PlanBuilder, holders: Sequence[int], budget: AbstractSet[int] = frozenset()
) -> tuple[list[int], int, set[int], set[int]]:
    """Idle instances that may join the chunk's ring, best first, and how many of them
    are within the long prompts' cap; also the instances long prompts occupy (with the
    holders) and the other chunked prompts' holders. `budget`: other budget-mode
    prompts' instances (reserved_budget.py), outside the cap's count and the ring."""
    partial = plan.partial_holders(state) - set(holders)
    extra = [
        i
        for i in state.idle_instances()
        if i not in plan.taken and state.owner[i] is None and i not in holders
    ]
    extra.sort(key=lambda i: (i in partial, -int(state.kv.free[i]), i))
    # short-request isolation: instances not yet serving a long prompt join the ring
    # only while long prompts stay within their cap; beyond it only when the chunk's KV
    # does not fit otherwise (a time-based wait could deadlock: nothing else may be
    # running to wake the scheduler when shorts stop arriving)
    longs = long_instances(state, plan) | set(holders)
    allowed = long_instance_cap(state, plan.now) - len(longs - budget)
    within, beyond = [], []
    for i in extra:
        if i in budget:
            beyond.append(i)
        elif i in longs or allowed > 0:
            allowed -= i not in longs
            within.append(i)
        else:
            beyond.append(i)
    return within + beyond, len(within), longs, partial


def _reserve_prompt(state: SchedulerState, st: SchedulerRequest) -> bool:
    """Admit a long prompt's first chunk: the memory check, and its whole prompt's KV
    reserved (placed chunk by chunk)."""
    check = state.residents.memory_check()
    if not check.fits(st.remaining, st.prefill_target) or not state.kv.can_admit(st.prefill_target):
        return False
    state.kv.admit(st.rid, st.prefill_target)
    return True


def _chunk_time(state: SchedulerState, chunk: int, start: int, dop: int, num_holders: int) -> float:
    cost, tp = state.cost, state.tp
    return cost.prefill_time(dop, chunk, chunk * chunk, tp) + cost.chunk_cross_time(
        chunk, start, num_holders, tp
    )


def _chunk_ring(
    state: SchedulerState,
    st: SchedulerRequest,
    tokens: TokenRange,
    holders: tuple[int, ...],
    extra: list[int],
    num_within: int,
    partial: set[int],
) -> tuple[tuple[int, ...], tuple[KVKeep, ...], np.ndarray] | None:
    """The chunk's ring: holders plus the time-optimal number of extra instances (within
    the cap), grown further only if the KV needs it. Returns (ring, keeps, free slots
    with other chunked prompts' holders zeroed), or None when nothing fits."""
    chunk = len(tokens)
    # (spread KV: later chunks on the holders alone unless the KV needs more room)
    max_extra = 0 if state.config.spread_chunk_kv and holders else num_within
    timed = [
        (_chunk_time(state, chunk, tokens.start, len(holders) + n, len(holders)), n)
        for n in range(max_extra + 1)
        if len(holders) + n > 0
    ]
    if not timed:
        return None
    n_extra = min(timed, key=lambda tn: tn[0])[1]  # (the first of equal times)
    free = state.kv.free.copy()
    for i in partial:
        free[i] = 0
    while True:
        ring = tuple(holders) + tuple(extra[:n_extra])
        keeps = _chunk_keeps(state, tokens, ring, free.copy(), holders)
        if keeps is not None and all(state.kv.can_place(st.rid, k.instance, k.num_tokens) for k in keeps):
            return ring, keeps, free
        if n_extra >= len(extra):
            return None
        n_extra += 1


def _chunk_keeps(
    state: SchedulerState, tokens: TokenRange, ring: tuple[int, ...], free: np.ndarray, holders: Sequence[int]
) -> tuple[KVKeep, ...] | None:
    headroom = state.config.headroom_tokens
    if state.config.spread_chunk_kv:
        return spread_keeps(tokens, ring, free, headroom=headroom)
    return place_keeps(tokens, ring, free, headroom=headroom, prefer=holders)


def _budget_chunk(state: SchedulerState, start: int, end: int, dop: int, num_holders: int) -> int:
    """End of the longest chunk from `start` (at most to `end`, at least
    `min_chunk_tokens`) whose cost-model time fits `short_wait_budget_s`."""
    cfg = state.config

    def fits(n: int) -> bool:
        return _chunk_time(state, n, start, dop, num_holders) <= cfg.short_wait_budget_s

    lo, hi = min(cfg.min_chunk_tokens, end - start), end - start
    if fits(hi):
        return end
    while hi - lo > 1:  # fits(lo) or lo is the floor; not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return start + lo


def _emit_chunk(
    state: SchedulerState,
    plan: PlanBuilder,
    st: SchedulerRequest,
    tokens: TokenRange,
    ring: tuple[int, ...],
    keeps: tuple[KVKeep, ...],
    num_holders: int,
    borrow: set[int],
    delay_s: float = 0.0,
) -> None:
    """`delay_s`: the plan's migrations this chunk waits for (a widening)."""
    est = delay_s + _chunk_time(state, len(tokens), tokens.start, len(ring), num_holders)
    ring = group_by_node(ring, state.cost.node_of)  # the fewest network hops around the ring
    item = prefill_item(state, plan, st, tokens, ring, keeps)
    for k in keeps:
        state.kv.place(st.rid, k.instance, k.ranges)
    start_prefill(state, plan, ring, [item], [st], est=est, chunk=True)
    plan.taken.update(ring)
    for gid in sorted(borrow):
        plan.taken.update(state.groups[gid].instances)  # it cannot step while paused
        record_pause(state, plan, gid)
    state.stats["chunks"] += 1
