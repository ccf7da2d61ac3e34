"""Decode look-ahead: the next step of a one-instance decode group, planned while its
current step still runs (`ESPSchedulerConfig.decode_lookahead`).

Without it the controller plans step N+1 only once step N's result is back, so every
token pays the whole round trip (result to the controller, scheduler update, plan, the
sub-plan back to the instance). With it, step N+1 is planned right after step N: its
items carry `input_token=None` ("the token you sampled at `position`", which the
instance that mastered step N holds) and the instance starts it as soon as N ends,
while the controller's work for N overlaps N+1.

A group gets a look-ahead step only when nothing else could want its instance or
change its step, so the plan stays exactly what a normal step would be:

* exactly one step of the group is running, on ONE instance, planned by an earlier
  `schedule()` call (each step is its own sub-plan, so its result comes back alone),
  and it holds every request of the group (none finished or left since);
* the wait queue is empty (no prefill, packing or borrowing wants the instance) and no
  group is held back for a decode merge this call;
* nothing waits to be released on the instance (releases need an idle instance) and
  this plan's releases, adoptions and migrations do not touch it;
* every request's new token finds a slot on the instance (no scale-up, no preemption),
  and the step would not scale up for compute;
* no request's running step can be its last by max_tokens or max_model_len (then the
  pipeline just waits one step).

A request that still finishes at step N (EOS, a stop id, an abort) is in step N+1: its
N+1 token is dropped and its KV released once N+1 completes (completion.py). At most
two steps of a group run at once: `DecodeGroup.earlier_batch` / `SchedulerRequest.
earlier_batch` name the earlier one, `running_batch` / `batch` the later one.
"""

from __future__ import annotations

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.decode import start_step, wants_compute_scale
from esp_core.sched.plan import DecodeBatch, DecodeItem, TokenRange
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup, Phase, SchedulerRequest


def plan_lookaheads(state: SchedulerState, plan: PlanBuilder, held: set[int]) -> None:
    """A look-ahead step for every eligible group (module doc)."""
    if not state.config.decode_lookahead or state.queue or held:
        return
    for g in list(state.groups.values()):
        inst = lookahead_instance(state, plan, g)
        if inst is not None:
            plan.decodes.append(_start_lookahead(state, plan, g, inst))


def lookahead_instance(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup) -> int | None:
    """The instance of `g`'s look-ahead step, or None when it gets none now."""
    if g.running_batch is None or g.earlier_batch is not None or g.paused_by or len(g.instances) != 1:
        return None
    (inst,) = g.instances
    running = state.running.get(g.running_batch)
    if running is None or running.kind != "decode" or running.instances != (inst,):
        return None
    if any(b.batch_id == running.batch_id for b in plan.decodes):
        return None  # planned in this very plan: the look-ahead goes in the next one
    if (
        not g.requests
        or len(running.requests) != len(g.requests)
        or not all(r in g.requests for r in running.requests)
    ):
        return None  # a request finished or left since the running step was planned
    if _touched_by_plan(plan, inst) or _release_waits_on(state, inst):
        return None
    n = len(g.requests)
    if state.kv.free[inst] < n or state.kv.unreserved_free < n:
        return None
    if any(_may_end_in_flight(state, state.requests[r]) for r in g.requests):
        return None
    if wants_compute_scale(state, plan, g, n):
        return None
    return inst


def _touched_by_plan(plan: PlanBuilder, inst: int) -> bool:
    return (
        inst in plan.taken
        or any(inst in r.instances for r in plan.releases)
        or any(inst in a.instances for a in plan.adoptions)
        or inst in plan.migrating()
    )


def _release_waits_on(state: SchedulerState, inst: int) -> bool:
    """A finished request's KV on `inst` waits for the instance to be idle."""
    for rid in (*state.pending_release, *state.release_after_batch):
        if inst in state.kv.holders(rid):
            return True
    return False


def _may_end_in_flight(state: SchedulerState, st: SchedulerRequest) -> bool:
    """The running step's token may be the request's last (besides EOS and stop ids)."""
    if st.phase != Phase.DECODE or st.earlier_batch is not None:
        return True
    outputs_after = len(st.outputs) + 1
    max_model_len = state.config.max_model_len
    return outputs_after >= st.max_tokens or (max_model_len is not None and st.seq_len + 1 >= max_model_len)


def _start_lookahead(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup, inst: int) -> DecodeBatch:
    """Items in the running step's order, each new token's KV slot on `inst`."""
    assert g.running_batch is not None
    earlier = state.running[g.running_batch]
    items = []
    for rid in earlier.requests:
        st = state.requests[rid]
        pos = st.seq_len  # the running step's position (seq_len - 1) + 1
        items.append(
            DecodeItem(
                request_id=rid,
                input_token=None,
                position=pos,
                master=inst,
                holders=state.kv.holders(rid),
                new_kv_instance=inst,
            )
        )
        state.kv.place(rid, inst, (TokenRange(pos, pos + 1),))
        st.earlier_batch = st.batch
    g.earlier_batch = g.running_batch
    batch = start_step(state, plan.now, g, items)
    # it starts when the earlier step ends
    ahead = state.running[batch.batch_id]
    ahead.est_end = max(earlier.est_end, plan.now) + (ahead.est_end - plan.now)
    plan.taken.add(inst)
    return batch
