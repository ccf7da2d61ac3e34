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

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.decode_merge import kv_may_move
from esp_core.sched.prefill import move_off, moved_ranges, spill
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup

# the steps saved must pay this many times the migrations' time (the move stalls the
# group's next step, and the steps-left estimate ignores early stops at EOS)
NARROW_GAIN_FACTOR = 2.0


def narrow_wide_groups(state: SchedulerState, plan: PlanBuilder) -> None:
    """Narrow every ready multi-instance group where it pays (module doc)."""
    cfg = state.config
    if not cfg.narrow_decode_groups or cfg.constant_decode_time_s is not None:
        return
    moving = plan.migrating()
    for g in list(state.groups.values()):
        if len(g.instances) < 2 or not g.ready or not g.requests or not kv_may_move(state, plan, g, moving):
            continue
        keep, leave = best_narrowing(state, g)
        if leave:
            move_off(state, g, leave, keep, plan.migrations)
            state.stats["decode_narrowings"] += 1


def best_narrowing(state: SchedulerState, g: DecodeGroup) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The instances to keep and those to move the group's KV off: the narrower width
    with the largest positive net gain, steps left x time saved per step -
    `NARROW_GAIN_FACTOR` x the migrations' time; ((), ()) when none has one. The KV
    moves onto the kept instances only: one of the group holding none of its KV leaves
    it after the step, whatever room it has."""
    kv, cost, tp = state.kv, state.cost, state.tp
    reads = {i: 0 for i in g.instances}  # the group's KV tokens on each instance
    for rid in g.requests:
        for i, n in kv.placement(rid).items():
            reads[i] = reads.get(i, 0) + n
    # the most of the group's KV first: the fewest tokens move (instances holding none
    # of it, e.g. left by an earlier move, leave the group before its step anyway)
    order = sorted((i for i in g.instances if reads[i] > 0), key=lambda i: (-reads[i], -int(kv.free[i]), i))
    steps_left = max(state.requests[r].remaining for r in g.requests)
    growth = sum(state.requests[r].remaining for r in g.requests)  # tokens still to come
    if steps_left <= 0 or len(order) < 2:
        return (), ()
    now_s = state.decode_step_estimate(g)
    best: tuple[float, tuple[int, ...], tuple[int, ...]] = (0.0, (), ())
    for width in range(1, len(order)):
        keep, leave = order[:width], order[width:]
        after = _reads_after_move(state, g, reads, keep, leave, growth)
        if after is None:
            continue  # no room for the moved KV and the tokens to come
        step_s = cost.decode_time(math.ceil(len(g.requests) / width), max(after.values()), width, tp)
        move_s = sum(_move_time(state, src, keep, reads[src]) for src in leave)
        net = steps_left * (now_s - step_s) - NARROW_GAIN_FACTOR * move_s
        if net > best[0]:
            best = (net, tuple(keep), tuple(leave))
    return best[1], best[2]


def _reads_after_move(
    state: SchedulerState,
    g: DecodeGroup,
    reads: dict[int, int],
    keep: Sequence[int],
    leave: Sequence[int],
    growth: int,
) -> dict[int, int] | None:
    """The group's KV per kept instance after `leave`'s KV moves onto them as `move_off`
    places it; None without room for it and the `growth` tokens still to come."""
    kv, headroom = state.kv, state.config.headroom_tokens
    free = {i: int(kv.free[i]) for i in keep}
    moved = sum(reads[i] for i in leave)
    if sum(free.values()) - moved - growth - headroom * len(keep) < 0 or kv.unreserved_free < growth:
        return None
    after = {i: reads[i] for i in keep}
    for _, _, rng in moved_ranges(state, g, leave):
        pieces = spill(free, len(rng))
        if pieces is None:
            return None
        for dst, take in pieces:
            after[dst] += take
    return after


def _move_time(state: SchedulerState, src: int, keep: Sequence[int], num_tokens: int) -> float:
    cost = state.cost
    cross = cost.node_of is not None and any(cost.node_of[src] != cost.node_of[i] for i in keep)
    return cost.migration_time(num_tokens, cross_node=cross, tp=state.tp)
