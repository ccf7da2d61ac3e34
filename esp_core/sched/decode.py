"""Decode steps: the next step of every ready decode group, with elastic scale-up.

Before the steps: small one-instance groups merge (decode_merge.py) and wide groups
narrow (decode_narrow.py) where the cost model says the move pays.

Per group step: instances that hold none of the group's KV leave the group; idle
instances join as extra masters while the step is compute-bound (`scale_for_compute`);
every request gets a master (scaling.assign_masters) and an instance for its new token's
KV (scaling.choose_new_kv_instance), scaling up by one idle instance when none of the
group's has a free slot, and preempting the latest arrival not yet stepped when no
instance is left (its KV is dropped, it is re-prefilled later over prompt + outputs).
"""

from __future__ import annotations

import math

import numpy as np

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.cache_ops import forget_source
from esp_core.sched.decode_merge import merge_small_groups
from esp_core.sched.decode_narrow import narrow_wide_groups
from esp_core.sched.plan import DecodeBatch, DecodeItem, Release, ReleaseReason, TokenRange
from esp_core.sched.scaling import assign_masters, choose_new_kv_instance, masters_per_instance
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup, Phase, RunningBatch, SchedulerRequest


def plan_decodes(state: SchedulerState, plan: PlanBuilder) -> set[int]:
    """The next step of every ready group; returns the groups held back for a decode
    merge (decode_merge.py)."""
    held = merge_small_groups(state, plan)
    narrow_wide_groups(state, plan)
    for g in list(state.groups.values()):
        if not g.ready or g.gid in held:
            continue
        if g.steps_since_borrow >= 1 and not plan.drained_for_chunk.isdisjoint(g.instances):
            continue  # drains for an aged chunk (it stepped since its last pause)
        if not g.requests:
            state.dissolve(g)
            continue
        batch = _plan_group_step(state, plan, g)
        if batch is not None:
            plan.decodes.append(batch)
    return held


def _plan_group_step(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup) -> DecodeBatch | None:
    rids = sorted(g.requests, key=lambda r: (state.requests[r].arrival, r))
    # an instance a decode merge of this plan moves KV off is busy until the move ends:
    # it stays in the group for this step (no master, no new token) and leaves it after
    moving_off = {m.src for m in plan.migrations} & g.instances
    _trim_to_holders(state, g, rids, moving_off)
    scale_for_compute(state, plan, g, len(rids))
    items = _step_items(state, plan, g, rids, moving_off)
    if not items:
        if not g.requests:
            state.dissolve(g)
        return None
    # instances may have been emptied by preemptions: keep the batch on what it uses
    used: set[int] = set(moving_off)
    for it in items:
        used.update(it.holders)
        used.add(it.master)
        used.add(it.new_kv_instance)
    for i in sorted(g.instances - used):
        g.instances.discard(i)
        state.owner[i] = None
    return start_step(state, plan.now, g, items)


def _trim_to_holders(state: SchedulerState, g: DecodeGroup, rids: list[str], keep: set[int]) -> None:
    """Instances that hold nothing of the group leave it (but `keep`)."""
    holding: set[int] = set(keep)
    for r in rids:
        holding.update(state.kv.holders(r))
    assert holding, f"group {g.gid}: decoding requests without KV"
    for i in sorted(g.instances - holding):
        g.instances.discard(i)
        state.owner[i] = None


def _step_items(
    state: SchedulerState, plan: PlanBuilder, g: DecodeGroup, rids: list[str], moving_off: set[int]
) -> list[DecodeItem]:
    """One item per request of the step, its new token's KV slot placed; requests
    that find no slot anywhere are preempted (latest arrival first). No master or new
    token on `moving_off`."""
    kv = state.kv
    insts = sorted(g.instances - moving_off)
    free = kv.free.copy()
    masters = assign_masters([kv.placement(r) for r in rids], insts)
    items: list[DecodeItem] = []
    pending = list(zip(rids, masters))
    while pending:
        rid, master = pending.pop(0)
        st = state.requests[rid]
        held = kv.placement(rid)
        # (slots reserved for chunked prompts are not available to decode)
        room = kv.unreserved_free > 0
        nk = choose_new_kv_instance(master, held, insts, free) if room else None
        if nk is None and room:
            nk = _scale_up_for_kv(state, plan, g, free)
            if nk is not None:
                insts = sorted(g.instances - moving_off)
        if nk is None:
            # preempt the latest arrival not yet stepped (possibly this request), but not
            # one whose KV a share of this plan reads (releases run before adoptions)
            cands = [r for r in [rid] + [r for r, _ in pending] if r not in plan.share_sources]
            if not cands:
                continue  # this request skips a step: it steps with the group next time
            victim = max(cands, key=lambda r: (state.requests[r].arrival, r))
            plan.releases.append(preempt(state, state.requests[victim], plan.now))
            free = kv.free.copy()  # already includes this step's placed tokens
            if victim != rid:
                pending = [(r, m) for r, m in pending if r != victim]
                pending.insert(0, (rid, master))
            continue
        free[nk] -= 1
        pos = st.seq_len - 1
        items.append(
            DecodeItem(
                request_id=rid,
                input_token=st.outputs[-1],
                position=pos,
                master=master,
                holders=kv.holders(rid),
                new_kv_instance=nk,
            )
        )
        kv.place(rid, nk, (TokenRange(pos, pos + 1),))
    return items


def start_step(state: SchedulerState, now: float, g: DecodeGroup, items: list[DecodeItem]) -> DecodeBatch:
    bid = state.next_id()
    insts = tuple(sorted(g.instances))
    for i in insts:
        state.busy[i] = bid
    for it in items:
        state.requests[it.request_id].batch = bid
    g.running_batch = bid
    g.steps_since_borrow += 1
    if state.config.constant_decode_time_s is not None:
        est = state.config.constant_decode_time_s
    else:
        kv_max = max(int(state.kv.used[i]) for i in insts)
        est = state.cost.decode_time(
            masters_per_instance([it.master for it in items]), kv_max, len(insts), state.tp
        )
    state.running[bid] = RunningBatch(
        bid, "decode", insts, tuple(it.request_id for it in items), now, now + est, group=g.gid
    )
    state.stats["decode_steps"] += 1
    return DecodeBatch(batch_id=bid, instances=insts, items=tuple(items))


def _scale_up_candidates(state: SchedulerState, plan: PlanBuilder) -> list[int]:
    partial = plan.partial_holders(state)
    return [i for i in state.idle_instances() if state.owner[i] is None and i not in partial]


def scale_for_compute(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup, batch_size: int) -> None:
    """Add idle instances as extra masters while the step is compute-bound (loongserve:
    more than θ requests per instance; esp: while the cost model says the step gets
    faster). Never while prefills wait for instances."""
    if state.queue:
        return
    cands = _scale_up_candidates(state, plan)
    while cands and _one_more_pays(state, g, batch_size):
        inst = max(cands, key=lambda i: (int(state.kv.free[i]), -i))
        cands.remove(inst)
        g.instances.add(inst)
        state.owner[inst] = g.gid
        state.stats["scale_ups"] += 1


def wants_compute_scale(state: SchedulerState, plan: PlanBuilder, g: DecodeGroup, batch_size: int) -> bool:
    """Whether `scale_for_compute` would add an instance to `g`'s next step."""
    return (
        not state.queue and bool(_scale_up_candidates(state, plan)) and _one_more_pays(state, g, batch_size)
    )


def _one_more_pays(state: SchedulerState, g: DecodeGroup, batch_size: int) -> bool:
    cfg = state.config
    m = len(g.instances)
    if cfg.is_loongserve or cfg.constant_decode_time_s is not None:
        return batch_size / m > cfg.decode_batch_threshold
    if batch_size / m <= cfg.decode_batch_threshold:
        return False
    kv_max = state.step_kv_max(g)
    now_t = state.cost.decode_time(math.ceil(batch_size / m), kv_max, m, state.tp)
    new_t = state.cost.decode_time(math.ceil(batch_size / (m + 1)), kv_max, m + 1, state.tp)
    return new_t < now_t


def _scale_up_for_kv(
    state: SchedulerState, plan: PlanBuilder, g: DecodeGroup, free: np.ndarray
) -> int | None:
    cands = [i for i in _scale_up_candidates(state, plan) if free[i] > 0]
    if not cands:
        return None
    inst = max(cands, key=lambda i: (int(free[i]), -i))
    g.instances.add(inst)
    state.owner[inst] = g.gid
    state.stats["scale_ups"] += 1
    return inst


def preempt(state: SchedulerState, st: SchedulerRequest, now: float) -> Release:
    """Drop a decoding request's KV; it is re-prefilled later over prompt + outputs."""
    assert st.group is not None
    g = state.groups[st.group]
    del g.requests[st.rid]
    holders = state.kv.release(st.rid)
    forget_source(state, st.rid)
    state.residents.drop(st)
    st.phase = Phase.WAITING
    st.group = None
    st.batch = None
    st.prefill_target = st.seq_len
    st.prefilled = 0
    st.preemptions += 1
    st.wait_since = now
    state.queue.push(st)
    state.stats["preemptions"] += 1
    return Release(st.rid, holders, ReleaseReason.PREEMPTED)
