"""Start a lone long prompt later on a wider ring when that finishes it sooner.

A long prompt's ring is fixed when it starts (a whole prompt is one batch; a chunked
one keeps its first chunk's holders), so a prompt that starts on the one instance idle
right now runs at DoP 1 to its end, while instances that free up a moment later idle
(the end of a run: the last long prompts). When no other long prompt waits to start
(nothing else could use the idle instances for long work), the cost model compares
finishing the prompt now on the idle instances with waiting until running long
prefills end and starting on those as well; the prompt waits when the latter is sooner.
Running work always ends with an event, so the prompt is reconsidered then.
"""

from __future__ import annotations

from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import Phase, SchedulerRequest


def should_wait_for_wider_ring(
    state: SchedulerState, st: SchedulerRequest, num_idle: int, now: float, cap: int
) -> bool:
    """True when `st` (a long prompt not started) should not start on the `num_idle`
    idle instances it may use now: no other long prompt waits to start, and waiting for
    busy instances to free up gives a ring (at most `cap` instances) that the cost model
    says finishes the whole prompt sooner."""
    if not state.config.long_start_lookahead or other_long_waiting(state, st):
        return False
    best_now = now + _best_whole_time(state, st, num_idle) if num_idle else float("inf")
    for freed, t_free in enumerate(_busy_instance_ends(state, now), start=1):
        dop = min(num_idle + freed, cap)
        if dop > num_idle and t_free + _best_whole_time(state, st, dop) < best_now:
            # (a counter only once used: the default counters, hence plan digests, unchanged)
            state.stats["ring_waits"] = state.stats.get("ring_waits", 0) + 1
            return True
    return False


def other_long_waiting(state: SchedulerState, st: SchedulerRequest) -> bool:
    """Another long prompt that has not started yet waits in the queue."""
    for rid in state.queue:
        other = state.requests[rid]
        if other is not st and other.phase == Phase.WAITING and state.is_long(other):
            if not state.kv.holders(rid):
                return True
    return False


def _busy_instance_ends(state: SchedulerState, now: float) -> list[float]:
    """When each busy or decode-owned instance is estimated to free up, soonest first:
    its running batch's estimated end, then its decode group's remaining steps. An
    instance running a chunk with more chunks to follow, or holding a chunked prompt's
    KV between chunks, stays busy (left out)."""
    partial = state.partial_holders()
    group_end: dict[int, float] = {}
    ends: list[float] = []
    for i in range(state.cluster.num_instances):
        if i in partial or (state.busy[i] is None and state.owner[i] is None):
            continue
        t, bid = now, state.busy[i]
        if bid is not None:
            b = state.running[bid]
            if b.kind == "prefill" and any(
                state.requests[rid].prefilled < state.requests[rid].prefill_target for rid in b.requests
            ):
                continue
            t = max(b.est_end, now)
        gid = state.owner[i]
        if gid is not None:
            if gid not in group_end:
                g = state.groups[gid]
                steps = max((state.requests[rid].remaining for rid in g.requests), default=0)
                group_end[gid] = steps * state.decode_step_estimate(g)
            t += group_end[gid]
        ends.append(t)
    ends.sort()
    return ends


def _best_whole_time(state: SchedulerState, st: SchedulerRequest, max_dop: int) -> float:
    """Cost-model time of the whole remaining prompt in one batch on the best ring of at
    most `max_dop` instances."""
    n = st.prefill_target - st.prefilled
    return min(state.cost.prefill_time(d, n, n * n, state.tp) for d in range(1, max_dop + 1))
