"""Decode merges: small one-instance decode groups move onto another group's instance.

With chunked prefill, short requests are prefilled one or two at a time on whichever
instance is free (often a long prompt's holder between its chunks), and each forms its
own decode group there: many groups of one or two requests, each step paying the whole
per-iteration time for them alone, and each pausing (or being paused by) the long
prompt's chunks on its instance. A decode step costs little more for two requests than
for one, so a ready one-instance group whose KV is small is moved (KV migrated) onto
another ready one-instance group's instance when the cost model says the steps saved
outweigh the move; the group it leaves frees its instance for prefill.

Which moves: a group moves only between instances of the same kind -- both holding a
chunked prompt's earlier chunks, or neither -- so short requests' decodes never crowd
the instance left to short prefills, nor add pauses to a long prompt's chunks on holders
they were not on. Groups on holders move first, the least KV first, onto the instance with the most
free KV.
Two groups are rarely ready at once (groups step back to back), so a group with no
ready target but one whose step ends within one of its own is held back for that call
and merges when it does. The instance a group leaves stays in the merged group for the
step of the move (it is busy until the migration ends), holding no new token, and
leaves it after. No move when the KV room (also counting reserved slots) cannot take
both groups' remaining tokens, so the step of the move never preempts.
"""

from __future__ import annotations

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.plan import Migration
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup

# the steps a merge saves must pay this many times the migration's time (the move
# occupies both instances, and the remaining-steps estimate ignores early finishes)
_MERGE_GAIN_FACTOR = 2.0


def merge_small_groups(state: SchedulerState, plan: PlanBuilder) -> set[int]:
    """Move small ready one-instance decode groups onto another's instance (module doc).
    Returns the groups held back this call: no target is ready now, but one ends its
    step within one of theirs (groups step back to back, so two are rarely ready at
    once); they merge when it does."""
    if not state.config.merge_decode_groups or state.prefix_cache is not None:
        return set()  # (shared prefix-cache KV never migrates)
    groups = _mergeable(state, plan)
    if not groups:
        return set()
    partial = plan.partial_holders(state)
    # groups on chunked prompts' holders first (fewer groups there: fewer pauses for
    # the prompts' chunks), then the least KV to move
    groups.sort(key=lambda g: (_instance(g) not in partial, _kv_tokens(state, g), g.gid))
    targets: set[int] = set()
    for src in groups:
        if src.gid in targets or src.gid not in state.groups:
            continue
        dst = _best_target(state, src, [g for g in groups if g is not src and g.gid in state.groups], partial)
        if dst is not None:
            _move_group(state, plan, src, dst)
            targets.add(dst.gid)
    held: set[int] = set()
    for src in groups:
        if src.gid in state.groups and src.gid not in targets:
            soon = _ending_soon(state, plan.now + state.decode_step_estimate(src))
            if _best_target(state, src, soon, partial) is not None:
                held.add(src.gid)
    return held


def _ending_soon(state: SchedulerState, by: float) -> list[DecodeGroup]:
    """One-instance groups whose running step ends by `by` (and then are ready)."""
    out = []
    for g in state.groups.values():
        if g.running_batch is None or g.paused_by or len(g.instances) != 1 or not g.requests:
            continue
        if state.running[g.running_batch].est_end <= by:
            out.append(g)
    return out


def _instance(g: DecodeGroup) -> int:
    return next(iter(g.instances))


def _kv_tokens(state: SchedulerState, g: DecodeGroup) -> int:
    return sum(sum(state.kv.placement(r).values()) for r in g.requests)


def _mergeable(state: SchedulerState, plan: PlanBuilder) -> list[DecodeGroup]:
    """Ready one-instance groups between steps, not borrowed, drained or read by a copy,
    and on no instance a migration of this plan already uses (a compacted group steps
    after its migration, in this plan)."""
    moving = plan.migrating()
    return [
        g
        for g in state.groups.values()
        if g.ready and g.requests and len(g.instances) == 1 and kv_may_move(state, plan, g, moving)
    ]


def kv_may_move(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup, moving: set[int]) -> bool:
    """Whether a ready group's KV may migrate in this plan: none of its instances is busy,
    taken, drained for a chunk or already moving KV (`moving`), and none of its requests'
    KV is shared (prefix-cache segments) or read by a share of this plan."""
    if any(
        state.busy[i] is not None or i in plan.taken or i in plan.drained_for_chunk or i in moving
        for i in g.instances
    ):
        return False
    return not any(state.kv.in_segments(r) or r in plan.share_sources for r in g.requests)


def _best_target(
    state: SchedulerState, src: DecodeGroup, others: list[DecodeGroup], partial: set[int]
) -> DecodeGroup | None:
    """The one-instance group to move `src` onto: on the same kind of instance (module
    doc), the most free KV; None when no move pays or fits."""
    cfg, cost, tp = state.config, state.cost, state.tp
    a = _instance(src)
    moved = _kv_tokens(state, src)
    growth = sum(state.requests[r].remaining for r in src.requests)
    src_steps = max(state.requests[r].remaining for r in src.requests)
    best: tuple[int, DecodeGroup] | None = None
    for dst in others:
        b = _instance(dst)
        if len(dst.instances) != 1 or len(src.requests) + len(dst.requests) > cfg.decode_batch_threshold:
            continue  # (a group moved onto this call keeps the left instance for a step)
        if (a in partial) != (b in partial):
            continue
        dst_growth = sum(state.requests[r].remaining for r in dst.requests)
        room = int(state.kv.free[b]) - moved - growth - dst_growth - cfg.headroom_tokens
        # (and no preemption in the step of the move: its migration must not be for
        # nothing, nor leave the instances busy with no step the scheduler waits for)
        room = min(room, state.kv.unreserved_free - growth - dst_growth)
        if room < 0 or not all(
            state.kv.can_place(r, b, state.kv.placement(r).get(a, 0)) for r in src.requests
        ):
            continue
        steps = min(src_steps, max(state.requests[r].remaining for r in dst.requests))
        cross = cost.node_of is not None and cost.node_of[a] != cost.node_of[b]
        gain = steps * state.decode_step_estimate(src)
        if gain < _MERGE_GAIN_FACTOR * cost.migration_time(moved, cross_node=cross, tp=tp):
            continue
        if best is None or int(state.kv.free[b]) > best[0]:
            best = (int(state.kv.free[b]), dst)
    return None if best is None else best[1]


def _move_group(state: SchedulerState, plan: PlanBuilder, src: DecodeGroup, dst: DecodeGroup) -> None:
    """Migrate `src`'s KV onto `dst`'s instance and fold `src` into `dst`; `src`'s
    instance stays in `dst` until the step of the move (decode.py)."""
    a, b = _instance(src), _instance(dst)
    for rid in src.requests:
        ranges = state.kv.ranges_on(rid, a)
        state.kv.move(rid, a, b, ranges)
        plan.migrations.append(Migration(rid, a, b, ranges))
        state.stats["migrations"] += 1
        state.stats["decode_merges"] += 1
        dst.requests[rid] = None
        state.requests[rid].group = dst.gid
    del state.groups[src.gid]
    dst.instances.add(a)
    state.owner[a] = dst.gid
    dst.steps_since_borrow = min(dst.steps_since_borrow, src.steps_since_borrow)
