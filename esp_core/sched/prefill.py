"""A prefill round for whole prompts: admit, allocate instances, batch, place the KV.

One round (`plan_round`) runs the four ESP steps in order:

1. admission (admission.py): waiting requests in FCFS order with bounded skip-ahead,
   within the KV room, the memory check and the round's time budget;
2. allocation (allocation.py): the idle instances no decode group owns, plus ready
   decode groups that are paused or compacted (KV migrated) when that pays;
3. batching (batching.py): the interval DP splits the admitted requests into batches on
   contiguous runs of the allocated instances;
4. placement (scaling.py): each request's KV is kept on the fullest instance of its ring
   that fits it (proactive scale-down), split over the emptiest ones otherwise.

`prefill_item` and `start_prefill` are shared with chunked prefill (chunked.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from esp_core.sched.admission import Candidate, admit_fcfs
from esp_core.sched.allocation import Allocation, GroupView, allocate
from esp_core.sched.batching import BatchingResult, plan_batches
from esp_core.sched.builder import PlanBuilder
from esp_core.sched.packing import PackChoice, choose_pack
from esp_core.sched.placement import group_by_node
from esp_core.sched.plan import KVKeep, Migration, PrefillBatch, PrefillItem, TokenRange, frozen_from_fields
from esp_core.sched.scaling import place_keeps
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup, Phase, RunningBatch, SchedulerRequest


@dataclass
class RoundPool:
    """The instances one round may use, and the KV room they offer."""

    free_idle: list[int]  # idle, owned by no decode group
    views: list[GroupView]  # ready decode groups that could lend their instances
    partial: set[int]  # holders of chunked prompts: no room for other requests' keeps
    keep_free: Callable[[int], int]  # free slots of an instance for this round's keeps
    room_max: int  # KV slots the round could use at most
    dop_max: int  # instances the round could use at most


def plan_round(state: SchedulerState, plan: PlanBuilder) -> None:
    """One non-chunked prefill round: admit, allocate, batch, place."""
    pool = _round_pool(state, plan)
    if pool.dop_max == 0:
        return
    admitted = _admit(state, pool)
    if not admitted:
        return
    if state.config.pack_decode and pool.free_idle:
        choice = choose_pack(state, admitted, pool.free_idle, pool.partial | plan.taken, plan.now)
        if choice is not None:
            if not choice.hold:
                _pack_round(state, plan, pool, admitted, choice)
            return
    alloc = _allocate(state, plan, pool, admitted)
    if not alloc.instances:
        return
    # node-contiguous: the batching DP gives each batch a contiguous run of this pool as
    # its ring, so every ring crosses the network once per node it enters
    ring_pool = list(group_by_node(alloc.instances, state.cost.node_of))
    free_for_keep = np.array([pool.keep_free(i) for i in ring_pool], dtype=np.int64)
    result = _batch(state, admitted, free_for_keep)
    if not admitted or result is None:
        return
    # compaction migrations happen before any batch of this plan (plan order)
    for gid, freed in alloc.compacted.items():
        compact(state, state.groups[gid], freed, plan.migrations)
    _place_batches(state, plan, admitted, result, ring_pool, pool.partial, alloc.migration_delay_s)
    for gid in alloc.paused_groups:
        if state.groups[gid].paused_by:
            record_pause(state, plan, gid)


def record_pause(state: SchedulerState, plan: PlanBuilder, gid: int) -> None:
    """Decode group `gid` pauses for a prefill of this plan on its instances."""
    g = state.groups[gid]
    state.stats["pauses"] += 1
    g.steps_since_borrow = 0
    plan.paused.extend(g.requests)


def _pack_round(
    state: SchedulerState,
    plan: PlanBuilder,
    pool: RoundPool,
    admitted: list[SchedulerRequest],
    choice: PackChoice,
) -> None:
    """The round on one instance alone (packing.py): a decode group's, which pauses
    for the prefill and which the new requests join, or an idle one."""
    assert choice.instance is not None
    if choice.take is not None:
        del admitted[choice.take :]  # the rest stay queued for the next round
    ring_pool = [choice.instance]
    result = _batch(state, admitted, np.array([pool.keep_free(choice.instance)], dtype=np.int64))
    if not admitted or result is None:
        return
    _place_batches(state, plan, admitted, result, ring_pool, pool.partial, 0.0)
    state.stats["packed_prefills"] += 1
    if choice.gid is not None:
        record_pause(state, plan, choice.gid)


def _round_pool(state: SchedulerState, plan: PlanBuilder) -> RoundPool:
    cfg = state.config
    idle = [i for i in state.idle_instances() if i not in plan.taken]
    partial = set() if cfg.short_kv_on_long_holders else plan.partial_holders(state)
    free_idle = [i for i in idle if state.owner[i] is None]
    ready = [
        g
        for g in state.groups.values()
        if g.ready and g.requests and all(state.busy[i] is None and i not in plan.taken for i in g.instances)
    ]
    views = [state.group_view(g) for g in ready]
    free_now = state.kv.free  # one snapshot: nothing below changes KV before the keeps

    def keep_free(i: int) -> int:
        return 0 if i in partial else int(free_now[i])

    # slots reserved for chunked prompts' later chunks are not available to others
    room_max = min(
        sum(keep_free(i) for i in free_idle) + sum(sum(v.free_slots) for v in views if v.borrowable),
        state.kv.unreserved_free,
    )
    dop_max = len(free_idle) + sum(len(v.instances) for v in views if v.borrowable)
    return RoundPool(free_idle, views, partial, keep_free, room_max, dop_max)


def _admission_candidates(state: SchedulerState, max_scan: int) -> Iterator[Candidate]:
    """Waiting, non-chunked requests in queue order, at most `max_scan` of them."""
    n = 0
    for rid in state.queue:
        st = state.requests[rid]
        if st.phase != Phase.WAITING or state.is_long(st) or rid in state.held_for_prefix:
            continue
        yield Candidate(rid, st.prefill_target - st.prefilled, st.remaining, st.times_passed)
        n += 1
        if n >= max_scan:
            return


def _admit(state: SchedulerState, pool: RoundPool) -> list[SchedulerRequest]:
    cfg, tp = state.config, state.tp
    # built lazily: admission usually stops (time budget, request cap) long before the
    # end of a 512-deep queue, and nothing it reads changes while it scans
    queue = _admission_candidates(state, cfg.max_scan)
    first = next(queue, None)
    if first is None:
        return []
    # the budget's time model, looked up once per round instead of once per candidate
    coeffs = state.cost.prefill_coeffs(pool.dop_max, tp)
    res = admit_fcfs(
        itertools.chain((first,), queue),
        state.residents.memory_check(),
        pool.room_max,
        max_skip_ahead=cfg.max_skip_ahead,
        max_requests=cfg.max_prefill_requests,
        max_scan=cfg.max_scan,
        time_fn=lambda s1, s2: coeffs.time(s1, s2) if s1 > 0 else 0.0,  # = cost.prefill_time
        max_time_s=cfg.max_prefill_time_s,
    )
    for rid, n in res.passed:
        state.requests[rid].times_passed += n
    return [state.requests[r] for r in res.admitted]


def _allocate(
    state: SchedulerState, plan: PlanBuilder, pool: RoundPool, admitted: list[SchedulerRequest]
) -> Allocation:
    cfg, tp, cost = state.config, state.tp, state.cost
    lens = [st.prefill_target - st.prefilled for st in admitted]
    s1, s2 = sum(lens), sum(x * x for x in lens)
    return allocate(
        free_instances=pool.free_idle,
        free_room=sum(pool.keep_free(i) for i in pool.free_idle),
        groups=pool.views,
        need_tokens=s1,
        num_new=len(admitted),
        prefill_time=lambda d: cost.prefill_time(d, s1, s2, tp),
        wait_alt_s=wait_without_borrowing(state, plan.now),
        gain_vs_delay=cfg.gain_vs_delay,
        allow_migration=cfg.allow_migration and not cfg.is_loongserve,
        migration_time=lambda n: cost.migration_time(n, tp=tp),
        growth_margin=cfg.headroom_tokens,
    )


def wait_without_borrowing(state: SchedulerState, now: float) -> float:
    """Estimated wait until instances free up by themselves (no decode group borrowed):
    the first running prefill's end, else the first decode group's drain."""
    ends = [b.est_end - now for b in state.running.values() if b.kind == "prefill"]
    if ends:
        return max(min(ends), 0.0)
    drains = []
    for g in state.groups.values():
        if g.requests:
            steps = min(state.requests[r].remaining for r in g.requests)
            drains.append(steps * state.decode_step_estimate(g))
    return min(drains) if drains else math.inf


def _batch(
    state: SchedulerState, admitted: list[SchedulerRequest], free_for_keep: np.ndarray
) -> BatchingResult | None:
    """The interval DP over the admitted requests; the latest admitted are dropped
    (from `admitted`, in place) until the rest fit."""
    cfg = state.config
    coeffs = state.cost.prefill_coeff_arrays(len(free_for_keep), state.tp)
    while admitted:
        lens = [st.prefill_target - st.prefilled for st in admitted]
        # the headroom is a preference: without it when nothing fits otherwise
        for headroom in dict.fromkeys((cfg.headroom_tokens, 0)):
            result = plan_batches(
                lens,
                free_for_keep,
                coeffs,
                max_request_groups=cfg.dp_max_request_groups,
                max_batch_groups=cfg.dp_max_batch_groups,
                headroom=headroom,
            )
            if result is not None:
                return result
        admitted.pop()
    return None


def _place_batches(
    state: SchedulerState,
    plan: PlanBuilder,
    admitted: list[SchedulerRequest],
    result: BatchingResult,
    ring_pool: list[int],
    partial: set[int],
    migration_delay_s: float,
) -> None:
    # after compaction; plain ints: placement reads it once per request and instance of
    # the ring (up to 256), where numpy scalar indexing costs several times more
    free = state.kv.free.tolist()
    for i in partial:
        free[i] = 0
    used: set[int] = set()
    kv, headroom = state.kv, state.config.headroom_tokens
    for ba in result.batches:
        ring = tuple(ring_pool[j] for j in ba.instances)
        batch_reqs = [admitted[j] for j in ba.requests]
        items = []
        for st in batch_reqs:
            tokens = TokenRange(st.prefilled, st.prefill_target)
            keeps = place_keeps(tokens, ring, free, headroom=headroom)
            if keeps is None:  # cannot happen when the DP's room check held
                raise AssertionError(f"no room to keep {st.rid} on {ring}")
            items.append(prefill_item(state, plan, st, tokens, ring, keeps))
            rid = st.rid
            for k in keeps:
                kv.place(rid, k.instance, k.ranges)
        start_prefill(state, plan, ring, items, batch_reqs, est=ba.est_time_s + migration_delay_s)
        used.update(ring)
    plan.taken.update(used)


def compact(state: SchedulerState, g: DecodeGroup, freed: Iterable[int], migrations: list[Migration]) -> None:
    """Move the group's KV off `freed` onto its other instances, which `freed` leave."""
    freed = set(freed)
    move_off(state, g, freed, g.instances - freed, migrations)
    for src in sorted(freed):
        g.instances.discard(src)
        state.owner[src] = None


def move_off(
    state: SchedulerState,
    g: DecodeGroup,
    freed: Iterable[int],
    onto: Iterable[int],
    migrations: list[Migration],
) -> None:
    """Migrate the group's KV on `freed` onto the instances `onto`, range by range onto
    the one with the most free room (`spill`); the group's instances stay as they are."""
    kv = state.kv
    free = {i: int(kv.free[i]) for i in sorted(onto)}
    for src, rid, rng in moved_ranges(state, g, freed):
        pieces = spill(free, len(rng))
        if pieces is None:
            raise AssertionError("compaction without room")
        pos = rng.start
        for dst, take in pieces:
            piece = (TokenRange(pos, pos + take),)
            kv.move(rid, src, dst, piece)
            migrations.append(Migration(rid, src, dst, piece))
            state.stats["migrations"] += 1
            pos += take


def moved_ranges(
    state: SchedulerState, g: DecodeGroup, freed: Iterable[int]
) -> list[tuple[int, str, TokenRange]]:
    """(source, request, range) of the group's KV on `freed`, in the order `move_off`
    moves them."""
    return [
        (src, rid, rng)
        for src in sorted(freed)
        for rid in list(g.requests)
        for rng in state.kv.ranges_on(rid, src)
    ]


def spill(free: dict[int, int], num_tokens: int) -> list[tuple[int, int]] | None:
    """`num_tokens` placed piece by piece onto the instance with the most room in `free`
    (ties: the lowest index), which is updated: [(instance, tokens)], or None when they
    do not fit."""
    pieces = []
    while num_tokens > 0:
        dst = max(free, key=lambda i: (free[i], -i))
        take = min(free[dst], num_tokens)
        if take <= 0:
            return None
        free[dst] -= take
        num_tokens -= take
        pieces.append((dst, take))
    return pieces


def prefill_item(
    state: SchedulerState,
    plan: PlanBuilder,
    st: SchedulerRequest,
    tokens: TokenRange,
    ring: tuple[int, ...],
    keeps: tuple[KVKeep, ...],
) -> PrefillItem:
    """The plan item of `tokens` of `st` on `ring` (call before placing its keeps)."""
    if not st.sent:
        plan.new_requests.append(st.req)
        st.sent = True
    # before this chunk's keeps are placed: the holders of positions < start
    cached = state.kv.holders(st.rid) if tokens.start else ()
    fields = {
        "request_id": st.rid,
        "tokens": tokens,
        "stripe_offset": state.next_stripe() % len(ring),
        "keep": tuple(keeps),
        "cached_holders": cached,
        "sample": tokens.end == st.prefill_target,
        "extra_token_ids": st.extra_token_ids(tokens.start, tokens.end) if st.outputs else (),
    }
    return frozen_from_fields(PrefillItem, fields)  # = PrefillItem(**fields), built once per request


def start_prefill(
    state: SchedulerState,
    plan: PlanBuilder,
    ring: tuple[int, ...],
    items: list[PrefillItem],
    batch_reqs: list[SchedulerRequest],
    est: float,
    chunk: bool = False,
) -> None:
    """Add a prefill batch to the plan and mark its instances, groups and requests."""
    bid = state.next_id()
    plan.prefills.append(PrefillBatch(batch_id=bid, instances=ring, items=tuple(items)))
    borrowed = sorted({o for i in ring if (o := state.owner[i]) is not None})
    for gid in borrowed:
        state.groups[gid].paused_by.add(bid)
    for i in ring:
        state.busy[i] = bid
    queue, residents = state.queue, state.residents
    for st, it in zip(batch_reqs, items):
        queue.remove(st)
        residents.add(st)
        residents.set_view(st, st.remaining, state.own_len(st, st.prefill_target))
        st.phase = Phase.PREFILLING
        st.batch = bid
        st.prefilled = it.tokens.end
        st.times_passed = 0
    state.running[bid] = RunningBatch(
        bid,
        "prefill",
        ring,
        tuple(st.rid for st in batch_reqs),
        plan.now,
        plan.now + est,
        sample={it.request_id: it.sample for it in items},
        borrowed_groups=tuple(borrowed),
        chunk=chunk,
    )
    state.stats["prefill_batches"] += 1
