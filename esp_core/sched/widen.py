"""Widen a chunked prompt's ring between chunks: migrate part of its cached KV onto idle
instances so that the remaining chunks' attention to the cached prefix spreads wider --
or, with no instance to add, even out the KV over the holders it has.

A chunked prompt's holders are fixed by its first chunk -- often one or two instances,
whatever was idle then -- and every later chunk attends to the cached prefix on those
holders alone (chunked.py: more instances than holders cannot speed that attention up,
it reads only the KV they hold). Near the end of a run the last long prompts crawl on
their few holders while other instances idle. And the holders' shares are often uneven
(a chunk's keeps are capped by each holder's free slots; a holder joins when the others
are full), while the holders attend in parallel, so the fullest one bounds every chunk.
With `widen_chunk_ring`, before a later chunk, the cost model compares

    remaining chunks on the current holders (charged on the fullest one)
    vs  migrations evening the cached KV out over the holders plus k idle instances
        + remaining chunks on that ring (k = 0: the same holders, evened out)

and takes the best ring when that is sooner. Each holder of the new ring ends with an
equal share (up to one token); later chunks spread their own KV evenly over the same
ring (`spread_chunk_kv`, required).

Idle instances are added only while no other long prompt waits to start (those take
idle instances for free, a widening pays a migration), only inside the long prompts'
cap (the shorts' reserved instance is never taken); never for a budget-mode prompt or
with the prefix cache on (shared KV never migrates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esp_core.sched.plan import Migration, TokenRange
from esp_core.sched.ring_lookahead import other_long_waiting
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import SchedulerRequest


@dataclass(frozen=True)
class Widening:
    """A wider ring for a chunked prompt: the KV moves that rebalance its cached prefix
    over `holders` (old holders first), and their estimated time before the chunk."""

    holders: tuple[int, ...]
    migrations: tuple[Migration, ...]
    delay_s: float
    time_s: float  # migrations + remaining chunks on the wider ring (cost model)
    time_narrow_s: float  # remaining chunks on the current holders (cost model)
    num_before: int  # holders before: fewer than `holders` when the ring widens

    @property
    def stat(self) -> str:
        """The counter it adds to: a widening, or a rebalancing over the same holders."""
        return "ring_widenings" if len(self.holders) > self.num_before else "kv_rebalances"


def plan_widening(
    state: SchedulerState, st: SchedulerRequest, holders: Sequence[int], candidates: Sequence[int]
) -> Widening | None:
    """The rebalancing of `st`'s cached KV over its holders plus the first k of
    `candidates` (idle instances no group owns and no other prompt holds, inside the
    cap, best first; k = 0 only while another long prompt waits to start) that the cost
    model says finishes its remaining chunks soonest; None when staying is as fast, or
    when widening does not apply (module doc)."""
    cfg = state.config
    if not (cfg.widen_chunk_ring and cfg.spread_chunk_kv) or not holders:
        return None
    if st.prefilled <= 0 or state.prefix_cache is not None or state.kv.in_segments(st.rid):
        return None
    if st.rid in state.budget_longs:
        return None
    if other_long_waiting(state, st):
        candidates = ()  # (they start on idle instances for free: a widening pays a move)
    per_holder = {i: state.kv.tokens_on(st.rid, i) for i in holders}
    room = [max(int(state.kv.free[i]) - cfg.headroom_tokens, 0) for i in holders]
    narrow = remaining_chunks_time(state, st, list(per_holder.values()), room)
    cached = sum(per_holder.values())
    best: Widening | None = None
    for k in range(len(candidates) + 1):
        ring = (*holders, *candidates[:k])
        slowest = -(-cached // len(ring))  # the fullest holder after an even split
        if not k and max(per_holder.values()) - slowest < cfg.min_chunk_tokens:
            continue  # (even up to the chunks' rounding: not worth a plan's moves)
        moves = rebalance(state, st.rid, per_holder, ring)
        if not moves:
            continue  # (a receiver lacks room; a wider ring asks less of each)
        delay = migrations_time(state, moves)
        # (each receiver has room for its share of the rest: `rebalance`)
        t = delay + remaining_chunks_time(state, st, [slowest] * len(ring))
        if t < narrow and (best is None or t < best.time_s):
            best = Widening(ring, moves, delay, t, narrow, len(holders))
    return best


def remaining_chunks_time(
    state: SchedulerState, st: SchedulerRequest, held: Sequence[int], room: Sequence[int] | None = None
) -> float:
    """Cost-model time of `st`'s remaining chunks (of `chunk_tokens`) on a ring of its
    holders, which hold `held` cached tokens each now and have `room` free slots each
    (None: room enough). Each chunk's KV is split evenly over them, a share capped by
    its holder's room and the rest spread over the others (as `spread_keeps`). The
    fullest holder bounds each chunk's attention to the cached prefix: charged as if
    every holder held as much."""
    cost, tp, size = state.cost, state.tp, state.config.chunk_tokens
    held, dop = list(held), len(held)
    left: list[int | None] = [None] * dop if room is None else list(room)
    total, start = 0.0, st.prefilled
    while start < st.prefill_target:
        n = min(size, st.prefill_target - start)
        total += cost.prefill_time(dop, n, n * n, tp) + cost.chunk_cross_time(n, max(held) * dop, dop, tp)
        _spread(n, held, left)
        start += n
    return total


def _spread(n: int, held: list[int], left: list[int | None]) -> None:
    """Add `n` tokens to `held`, evenly where `left` (free slots, None: unbounded) allows."""
    open_ = [j for j in range(len(held)) if (cap := left[j]) is None or cap > 0]
    while n > 0 and open_:
        each = -(-n // len(open_))
        for j in list(open_):
            cap = left[j]
            take = min(each, n) if cap is None else min(each, n, cap)
            held[j] += take
            n -= take
            if cap is not None:
                left[j] = cap - take
                if cap == take:
                    open_.remove(j)


def rebalance(
    state: SchedulerState, rid: str, per_holder: dict[int, int], ring: tuple[int, ...]
) -> tuple[Migration, ...] | None:
    """Moves that leave `rid`'s cached KV (now `per_holder`) split evenly over `ring`
    (its holders first, then new instances): each instance above its share sends its
    surplus -- its last positions -- to those below theirs, in ring order. None when a
    receiver lacks room for what it receives plus its share of the rest of the prompt."""
    cached = sum(per_holder.values())
    base, extra = divmod(cached, len(ring))
    share = {i: base + (j < extra) for j, i in enumerate(ring)}
    st = state.requests[rid]
    future = -(-(st.prefill_target - st.prefilled) // len(ring))
    headroom = state.config.headroom_tokens
    need: list[list[int]] = []  # [instance, tokens still to receive]
    for i in ring:
        missing = share[i] - per_holder.get(i, 0)
        if missing <= 0:
            continue
        if int(state.kv.free[i]) < missing + future + headroom:
            return None
        need.append([i, missing])
    moves: list[Migration] = []
    for src, have in per_holder.items():
        if have <= share[src]:
            continue
        tail = _tail(state.kv.ranges_on(rid, src), have - share[src])
        while tail and need:
            dst = need[0]
            piece, tail = _take(tail, dst[1])
            moves.append(Migration(rid, src, dst[0], piece))
            dst[1] -= sum(len(r) for r in piece)
            if dst[1] == 0:
                need.pop(0)
    return tuple(moves)


def _tail(ranges: Sequence[TokenRange], n: int) -> list[TokenRange]:
    """The last `n` positions of `ranges` (ascending), as ascending ranges."""
    out: list[TokenRange] = []
    for r in reversed(ranges):
        if n <= 0:
            break
        take = min(n, len(r))
        out.insert(0, TokenRange(r.end - take, r.end))
        n -= take
    return out


def _take(ranges: list[TokenRange], n: int) -> tuple[tuple[TokenRange, ...], list[TokenRange]]:
    """The first `n` positions of `ranges`, and the rest."""
    got: list[TokenRange] = []
    rest = list(ranges)
    while rest and n > 0:
        r = rest.pop(0)
        if len(r) <= n:
            got.append(r)
            n -= len(r)
        else:
            got.append(TokenRange(r.start, r.start + n))
            rest.insert(0, TokenRange(r.start + n, r.end))
            n = 0
    return tuple(got), rest


def migrations_time(state: SchedulerState, moves: Sequence[Migration]) -> float:
    """When the last of `moves` ends, from now: each runs after the earlier ones on
    either of its instances (plan order, as the executors run them)."""
    cost, tp, node_of = state.cost, state.tp, state.cost.node_of
    ready: dict[int, float] = {}
    end = 0.0
    for m in moves:
        n = sum(len(r) for r in m.ranges)
        cross = node_of is not None and node_of[m.src] != node_of[m.dst]
        start = max(ready.get(m.src, 0.0), ready.get(m.dst, 0.0))
        t = start + cost.migration_time(n, cross_node=cross, tp=tp)
        ready[m.src] = ready[m.dst] = t
        end = max(end, t)
    return end


def undo_widening(state: SchedulerState, migrations: list[Migration], w: Widening) -> None:
    """Take back `apply_widening` (its chunk could not be planned after all)."""
    for m in reversed(w.migrations):
        state.kv.move(m.request_id, m.dst, m.src, m.ranges)
        migrations.remove(m)
        state.stats["migrations"] -= 1
    state.stats[w.stat] -= 1


def apply_widening(state: SchedulerState, migrations: list[Migration], w: Widening) -> None:
    """Move the KV in the scheduler's accounting and add the moves to the plan (they run
    before the plan's batches)."""
    for m in w.migrations:
        state.kv.move(m.request_id, m.src, m.dst, m.ranges)
        migrations.append(m)
        state.stats["migrations"] += 1
    state.stats[w.stat] = state.stats.get(w.stat, 0) + 1  # (absent while the switch is off)
