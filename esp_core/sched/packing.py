"""Decode packing: short prompts join a running one-instance decode group instead of
starting a new group on an idle instance.

A decode step pays a fixed cost per instance (the forward's overhead, and reading all
the weights once) plus a little per request: with the cost model's
`T_dec = a + b·B + c·KV`, a step of B + k requests on one instance costs the
instance-time `b·k + c·KV_new` more than a step of B, while k requests decoding on an
idle instance of their own pay `a` again on every step. So a round of short prompts
whose KV fits beside a one-instance decode group is prefilled on that group's
instance (the group pauses for the prefill, as when prefill borrows it) and decodes
with it, while

* the KV fits there with the remaining tokens of both (no preemption later),
* the joint step stays compute-light (at most θ = `decode_batch_threshold` requests)
  and within `pack_step_slowdown` times the slower of the two steps it replaces (the
  group's own, and the round's on an idle instance): not a lone request's step, which
  on a CPU (a full step costs several lone ones) capped a group at a dozen rows, and
* the cost model says the joint step grows less than a new group's step would cost.

Groups step back to back, so a target is rarely between steps when a prompt arrives:
the round is held (nothing planned for it this call) when a target's running step or
prefill keeping all its KV on one instance ends within the time the prompt would take
on an idle instance plus `pack_hold_s`; a request is held only within that time of its
arrival, so each waits at most about one prefill plus `pack_hold_s` longer. That keeps
a burst together: its later arrivals find the first ones' prefill (or the group's step)
running and wait for it instead of starting groups of their own, each paying the fixed
step cost on every step. The choice is made at admission only: no KV ever migrates for it.
With no group to join or wait for, the round's first requests (as many as the bounds
allow) are prefilled on one idle instance instead of being spread over several by the
batching DP; the rest wait for the next round. Only when some idle instance is free
(otherwise allocation.py's borrowing applies), and never on a chunked prompt's holder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import RunningBatch, SchedulerRequest


@dataclass(frozen=True)
class PackChoice:
    """Where a round goes: `instance` of ready group `gid` now, or (`hold`) wait."""

    instance: int | None = None
    gid: int | None = None  # None: an idle instance, no group to join
    hold: bool = False
    take: int | None = None  # only the first `take` admitted requests (the rest wait)


def choose_pack(
    state: SchedulerState,
    admitted: Sequence[SchedulerRequest],
    free_idle: Sequence[int],
    excluded: set[int],
    now: float,
) -> PackChoice | None:
    """The ready one-instance group to pack `admitted` onto, a hold, an idle instance
    for the first of them, or None (place them as usual). `excluded`: instances this
    round may not use (chunked prompts' holders, instances taken by this plan)."""
    cfg, cost, tp, kv = state.config, state.cost, state.tp, state.kv
    k = len(admitted)
    prompt = sum(st.prefill_target - st.prefilled for st in admitted)
    growth = sum(st.remaining for st in admitted)
    longest = max(st.prefill_target - st.prefilled for st in admitted)
    new_step = cost.decode_time(k, prompt, 1, tp)  # the round alone on an idle instance
    limit = cfg.pack_step_slowdown * cost.decode_time(1, longest, 1, tp)
    prefill_alone = cost.prefill_time(
        1, prompt, sum((st.prefill_target - st.prefilled) ** 2 for st in admitted), tp
    )
    if prefill_alone > cfg.max_prefill_time_s:
        return None

    def fits(inst: int, requests: Sequence[str]) -> bool:
        """The round fits beside `requests` on `inst` within the bounds (module doc)."""
        if len(requests) + k > cfg.decode_batch_threshold:
            return False
        others = sum(state.requests[r].remaining for r in requests if r in state.requests)
        room = int(kv.free[inst]) - prompt - growth - others - cfg.headroom_tokens
        if room < 0 or prompt + growth > kv.unreserved_free:
            return False
        used = int(kv.used[inst])
        joint = cost.decode_time(len(requests) + k, used + prompt, 1, tp)
        alone = cost.decode_time(len(requests), used, 1, tp)
        # the alternative runs two steps, the group's and the round's on an idle
        # instance: the joint step is bounded by the slower of them, not by a lone
        # request's step (on a CPU a full step is several lone ones: that bound capped
        # groups at a dozen rows and spread a burst over several instances)
        return joint <= cfg.pack_step_slowdown * max(alone, new_step) and joint - alone < new_step

    best: tuple[int, int, int] | None = None  # (-requests, instance, gid): fullest first
    for g in state.groups.values():
        if len(g.instances) != 1 or not g.requests or not g.ready:
            continue
        inst = next(iter(g.instances))
        if inst in excluded or state.busy[inst] is not None or not fits(inst, list(g.requests)):
            continue
        key = (-len(g.requests), inst, g.gid)
        best = key if best is None or key < best else best
    if best is not None:
        return PackChoice(instance=best[1], gid=best[2])
    waited = now - min(st.wait_since for st in admitted)
    # a burst's later arrivals find the first ones' prefill or the group's step running:
    # waiting for it costs them at most `pack_hold_s` more, starting a group of their
    # own costs a fixed step cost on every step of their lives
    window = prefill_alone + cfg.pack_hold_s
    if waited <= window and _target_soon(state, fits, excluded, now + window - waited):
        return PackChoice(hold=True)
    return _fresh_instance(state, admitted, [i for i in free_idle if i not in excluded], limit)


def _fresh_instance(
    state: SchedulerState, admitted: Sequence[SchedulerRequest], free_idle: Sequence[int], limit: float
) -> PackChoice | None:
    """No group to join: the first requests of the round (as many as the bounds allow,
    at least two) on one idle instance, the fullest that fits them, instead of the
    batching DP spreading the round over several (one new group each)."""
    cfg, cost, tp, kv = state.config, state.cost, state.tp, state.kv
    take = prompt = growth = sq = 0
    for st in admitted:
        n = st.prefill_target - st.prefilled
        if take + 1 > cfg.decode_batch_threshold:
            break
        if cost.decode_time(take + 1, prompt + n, 1, tp) > limit:
            break
        if cost.prefill_time(1, prompt + n, sq + n * n, tp) > cfg.max_prefill_time_s:
            break
        take, prompt, growth, sq = take + 1, prompt + n, growth + st.remaining, sq + n * n
    if take < 2 or prompt + growth > kv.unreserved_free:
        return None
    room = [i for i in free_idle if int(kv.free[i]) - prompt - growth - cfg.headroom_tokens >= 0]
    if not room:
        return None
    inst = min(room, key=lambda i: (int(kv.free[i]), i))
    return PackChoice(instance=inst, take=take)


def _sole_holder(state: SchedulerState, rb: RunningBatch) -> int | None:
    """The one instance that keeps all the KV of a running batch's requests (a decode
    step of a one-instance group, a prefill whose ring keeps everything on one
    instance), else None."""
    if len(rb.instances) == 1:
        return rb.instances[0]
    if rb.kind != "prefill":
        return None
    holders = {i for r in rb.requests for i in state.kv.holders(r)}
    return holders.pop() if len(holders) == 1 else None


def _target_soon(
    state: SchedulerState, fits: Callable[[int, Sequence[str]], bool], excluded: set[int], by: float
) -> bool:
    """Whether a one-instance decode step, or a prefill keeping all its KV on one
    instance, ends by `by` on an instance the round would fit on afterwards."""
    for rb in state.running.values():
        if rb.chunk or rb.est_end > by:
            continue
        inst = _sole_holder(state, rb)
        if inst is None:
            continue
        if inst in excluded:
            continue
        owner = state.owner[inst]
        group = state.groups.get(owner) if owner is not None else None
        if rb.kind == "decode" and (group is None or len(group.instances) != 1 or group.paused_by):
            continue
        requests = list(group.requests) if group is not None else []
        if rb.kind == "prefill":
            requests += list(rb.requests)
        if fits(inst, requests):
            return True
    return False
