"""Decode narrowing: a multi-instance decode group gathers its KV onto fewer instances
when the cost model says the steps left pay for the move.

Chunked prefill spreads a long prompt's KV evenly over its chunk ring (`spread_chunk_kv`),
so its decode group spans the whole ring. Where a wide step costs more than it saves --
each extra instance pays its own share of the step (its plan, its Python step, each
layer's query/partial exchange) while the KV read it takes off the others is small at
this context length, as on CPU instances sharing cores -- every one of the request's
decode steps pays that. Before a ready group steps, the width whose step (cost model)
saves the most over the steps left, net of `NARROW_GAIN_FACTOR` times the migrations'
time, is chosen: the group keeps the instances holding most of its KV and migrates the
rest onto them (the most free room first, as a borrow's compaction does). The instances
it leaves stay in the group for the step of the move (busy until their migrations end;
no master, no new token) and leave it after (decode.py trims them).

Not when: a request's KV lies in shared segments or is read by a prefix-cache share of
this plan (such KV never migrates), an instance of the group is busy, taken, drained for
a chunk or moving KV in this plan, or the kept instances lack room for the moved KV plus
every token the group's requests may still produce (so the move never preempts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.prefill import move_off
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup

# the steps saved must pay this many times the migrations' time (the move stalls the
# group's next step, and the steps-left estimate ignores early stops at EOS)
NARROW_GAIN_FACTOR = 2.0


@dataclass(frozen=True)
class Narrowing:
    keep: tuple[int, ...]  # instances the group decodes on after the move
    leave: tuple[int, ...]  # instances its KV moves off
    step_s: float  # the cost model's step after the move
    move_s: float  # the migrations' time
    net_gain_s: float  # steps left x time saved per step - factor x move_s


def narrow_wide_groups(state: SchedulerState, plan: PlanBuilder) -> int:
    """Narrow every ready multi-instance group where it pays (module doc); returns how
    many groups moved KV in this plan."""
    cfg = state.config
    if not cfg.narrow_decode_groups or cfg.constant_decode_time_s is not None:
        return 0
    moved = 0
    for g in list(state.groups.values()):
        if len(g.instances) < 2 or not g.ready or not g.requests or not _may_move(state, plan, g):
            continue
        choice = best_narrowing(state, g)
        if choice is None:
            continue
        move_off(state, g, choice.leave, plan.migrations)
        state.stats["decode_narrowings"] += 1
        moved += 1
    return moved


def _may_move(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup) -> bool:
    moving = {i for m in plan.migrations for i in (m.src, m.dst)}
    for i in g.instances:
        if state.busy[i] is not None or i in plan.taken or i in plan.drained_for_chunk or i in moving:
            return False
    return not any(state.kv.in_segments(r) or r in plan.share_sources for r in g.requests)


def best_narrowing(state: SchedulerState, g: DecodeGroup) -> Narrowing | None:
    """The narrower width with the largest positive net gain, or None."""
    kv, cost, tp = state.kv, state.cost, state.tp
    reads = {i: 0 for i in g.instances}  # the group's KV tokens on each instance
    for rid in g.requests:
        for i, n in kv.placement(rid).items():
            reads[i] = reads.get(i, 0) + n
    # the most of the group's KV first: the fewest tokens move (instances holding none
    # of it, e.g. left by an earlier move, leave the group before its step anyway)
    order = sorted((i for i in g.instances if reads[i] > 0), key=lambda i: (-reads[i], -int(kv.free[i]), i))
    num_requests = len(g.requests)
    steps_left = max(state.requests[r].remaining for r in g.requests)
    growth = sum(state.requests[r].remaining for r in g.requests)
    if steps_left <= 0 or len(order) < 2:
        return None
    now_s = state.decode_step_estimate(g)
    best: Narrowing | None = None
    for width in range(1, len(order)):
        keep, leave = order[:width], order[width:]
        after = _reads_after_move(state, reads, keep, leave, growth)
        if after is None:
            continue  # no room for the moved KV and the tokens to come
        step_s = cost.decode_time(math.ceil(num_requests / width), max(after.values()), width, tp)
        move_s = sum(_move_time(state, src, keep, reads[src]) for src in leave)
        net = steps_left * (now_s - step_s) - NARROW_GAIN_FACTOR * move_s
        if net > 0 and (best is None or net > best.net_gain_s):
            best = Narrowing(tuple(keep), tuple(leave), step_s, move_s, net)
    return best


def _reads_after_move(
    state: SchedulerState, reads: dict[int, int], keep: Sequence[int], leave: Sequence[int], growth: int
) -> dict[int, int] | None:
    """The group's KV per kept instance after `leave`'s KV moves onto the one with the
    most free room, piece by piece (as `move_off` places it); None without room."""
    kv, headroom = state.kv, state.config.headroom_tokens
    free = {i: int(kv.free[i]) for i in keep}
    moved = sum(reads[i] for i in leave)
    if sum(free.values()) - moved - growth - headroom * len(keep) < 0 or kv.unreserved_free < growth:
        return None
    after = {i: reads[i] for i in keep}
    for src in leave:
        left = reads[src]
        while left > 0:
            dst = max(keep, key=lambda i: (free[i], -i))
            take = min(free[dst], left)
            if take <= 0:
                return None
            free[dst] -= take
            after[dst] += take
            left -= take
    return after


def _move_time(state: SchedulerState, src: int, keep: Sequence[int], num_tokens: int) -> float:
    cost = state.cost
    cross = cost.node_of is not None and any(cost.node_of[src] != cost.node_of[i] for i in keep)
    return cost.migration_time(num_tokens, cross_node=cross, tp=state.tp)
