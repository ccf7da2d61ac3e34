"""What happens when a batch completes, and when a request finishes.

`apply_result` records one batch's result: sampled tokens, finishes (max tokens, EOS
unless ignore_eos, stop ids, min_tokens, max_model_len), chunked prompts back in the
queue for their next chunk, new decode groups (merged with every group sharing an
instance), paused groups resumed. A failed batch fails its requests.

A finished request's KV is released by the next plan (`emit_releases`), or once the
running batch it is still part of completes: releases never touch a busy instance. A
request that finishes at a decode step whose look-ahead step runs (lookahead.py) is in
that step too: the look-ahead's token is dropped and the KV released after it.
With the prefix cache on, a request that finished normally keeps its KV as a cache
entry instead (cache_ops.py: `retain`).
"""

from __future__ import annotations

from esp_core.sched.cache_ops import forget_source, note_written, retain
from esp_core.sched.interface import FinishReason, RequestEvent
from esp_core.sched.plan import BatchResult, Release, ReleaseReason, SampledToken
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import DecodeGroup, Phase, RunningBatch, SchedulerRequest


def apply_result(state: SchedulerState, result: BatchResult, now: float) -> list[RequestEvent]:
    batch = state.running.pop(result.batch_id, None)
    if batch is None:
        raise KeyError(f"unknown or already completed batch {result.batch_id}")
    for i in batch.instances:
        if state.busy[i] == batch.batch_id:
            state.busy[i] = None
    if result.error is not None:
        return _batch_failed(state, batch, result.error)
    tokens = {s.request_id: s for s in result.sampled}
    if batch.kind == "prefill":
        return _prefill_done(state, batch, tokens, now)
    return _decode_done(state, batch, tokens)


def _batch_failed(state: SchedulerState, batch: RunningBatch, error: str) -> list[RequestEvent]:
    events = []
    for rid in batch.requests:
        st = state.requests[rid]
        still_running = _leave_batch(st, batch.batch_id)
        if st.phase == Phase.DONE:
            if not still_running:
                _release_after_batch(state, rid)
            continue
        finish(state, st, ReleaseReason.ABORTED)
        events.append(
            RequestEvent(
                rid,
                finish_reason=FinishReason.ERROR,
                error=error,
                num_prompt_tokens=st.prompt_len,
                num_output_tokens=len(st.outputs),
            )
        )
    if batch.kind == "decode" and batch.group in state.groups:
        _group_step_done(state.groups[batch.group], batch.batch_id)
    _resume_borrowed(state, batch)
    return events


def _leave_batch(st: SchedulerRequest, batch_id: int) -> bool:
    """`st`'s batch `batch_id` completed; returns whether a later (look-ahead) step of
    it still runs (lookahead.py)."""
    if st.earlier_batch == batch_id:
        st.earlier_batch = None
        return True
    st.batch = None
    return False


def _group_step_done(g: DecodeGroup, batch_id: int) -> None:
    if g.earlier_batch == batch_id:
        g.earlier_batch = None  # its look-ahead step still runs
    elif g.running_batch == batch_id:
        g.running_batch = None


def _prefill_done(
    state: SchedulerState, batch: RunningBatch, tokens: dict[str, SampledToken], now: float
) -> list[RequestEvent]:
    events = []
    joined: list[SchedulerRequest] = []
    for rid in batch.requests:
        st = state.requests[rid]
        st.batch = None
        if st.phase == Phase.DONE:
            _release_after_batch(state, rid)
            continue
        note_written(state, st)  # its prompt blocks computed so far: a share source
        if not batch.sample[rid]:  # a chunk before the last: back in the queue
            st.phase = Phase.PARTIAL
            st.wait_since = now
            state.queue.push(st)
            continue
        tok = tokens.get(rid)
        if tok is None:
            raise ValueError(f"prefill result of batch {batch.batch_id} lacks a token for {rid}")
        st.prefill_target = st.prompt_len  # back to normal bookkeeping
        st.phase = Phase.DECODE
        events.append(_record_token(state, st, tok))
        if st.phase == Phase.DECODE:
            joined.append(st)
    _resume_borrowed(state, batch)
    if joined:
        _form_group(state, joined)
    return events


def _decode_done(
    state: SchedulerState, batch: RunningBatch, tokens: dict[str, SampledToken]
) -> list[RequestEvent]:
    events = []
    state.decode_steps_since_prefill_check += 1
    g = state.groups.get(batch.group) if batch.group is not None else None
    if g is not None:
        _group_step_done(g, batch.batch_id)
    for rid in batch.requests:
        st = state.requests[rid]
        still_running = _leave_batch(st, batch.batch_id)
        if st.phase == Phase.DONE:
            # its token is dropped; a look-ahead step still running holds its KV until it ends
            if not still_running:
                _release_after_batch(state, rid)
            continue
        tok = tokens.get(rid)
        if tok is None:
            raise ValueError(f"decode result of batch {batch.batch_id} lacks a token for {rid}")
        events.append(_record_token(state, st, tok))
    if g is not None and not g.requests and g.ready:
        state.dissolve(g)
    return events


def _record_token(state: SchedulerState, st: SchedulerRequest, tok: SampledToken) -> RequestEvent:
    st.outputs.append(tok.token_id)
    state.residents.set_view(st, st.remaining, state.own_len(st, st.kv_len))
    reason = _finish_reason(state, st, tok.token_id)
    if reason is not None:
        finish(state, st, ReleaseReason.FINISHED)
    return RequestEvent(
        st.rid,
        token=tok,
        finish_reason=reason,
        num_prompt_tokens=st.prompt_len,
        num_output_tokens=len(st.outputs),
        num_cached_tokens=st.cached_tokens,
    )


def _finish_reason(state: SchedulerState, st: SchedulerRequest, token_id: int) -> FinishReason | None:
    sp, n = st.req.sampling, len(st.outputs)
    max_model_len = state.config.max_model_len
    if n >= sp.min_tokens and (
        token_id in sp.stop_token_ids or (not sp.ignore_eos and token_id in state.config.eos_token_ids)
    ):
        return FinishReason.STOP
    if n >= sp.max_tokens or (max_model_len is not None and st.seq_len >= max_model_len):
        return FinishReason.LENGTH
    return None


def finish(state: SchedulerState, st: SchedulerRequest, reason: ReleaseReason) -> None:
    """Request done (finished / aborted / failed): leave queue and group; its KV is
    released by the next plan (or when its running batch completes)."""
    rid = st.rid
    forget_source(state, rid)
    if st.phase in (Phase.WAITING, Phase.PARTIAL):
        state.queue.remove(st)
    if st.group is not None:
        g = state.groups.get(st.group)
        if g is not None:
            g.requests.pop(rid, None)
        st.group = None
    st.phase = Phase.DONE
    state.residents.drop(st)
    if st.batch is not None:
        state.release_after_batch[rid] = reason
    else:
        _retire(state, st, reason)


def _release_after_batch(state: SchedulerState, rid: str) -> None:
    """A request that finished while in a batch: its release is due now the batch is done.
    One that finished normally (at the step before a look-ahead step, lookahead.py) keeps
    its KV as a prefix-cache entry, as it would have without the look-ahead; the entry
    then also covers the look-ahead step's position (the KV of its last token)."""
    reason = state.release_after_batch.pop(rid, None)
    if reason is None:
        state.forget(rid)
    else:
        _retire(state, state.requests[rid], reason)


def _retire(state: SchedulerState, st: SchedulerRequest, reason: ReleaseReason) -> None:
    """A done request in no running batch: its KV lives on as a prefix-cache entry
    (finished normally, cache_ops.py), or waits for its release, or nothing is left."""
    if reason == ReleaseReason.FINISHED and retain(state, st):
        state.forget(st.rid)
    elif state.kv.holders(st.rid) or state.kv.reserved(st.rid):
        state.pending_release[st.rid] = reason
    else:
        state.forget(st.rid)


def emit_releases(state: SchedulerState) -> list[Release]:
    """Releases of finished requests whose instances are idle (the rest wait)."""
    out = []
    for rid, reason in list(state.pending_release.items()):
        holders = state.kv.holders(rid)
        if any(state.busy[i] is not None for i in holders):
            continue  # its instances are lent to a running prefill: later
        del state.pending_release[rid]
        state.kv.release(rid)
        state.forget(rid)
        if holders:
            out.append(Release(rid, holders, reason))
    return out


def _resume_borrowed(state: SchedulerState, batch: RunningBatch) -> None:
    if not batch.borrowed_groups:
        return
    # borrowed groups may have merged into new ones since: look at every group
    for g in state.groups.values():
        g.paused_by.discard(batch.batch_id)


def _form_group(state: SchedulerState, members: list[SchedulerRequest]) -> None:
    """A decode group for requests whose prefill finished, merged with every group that
    shares an instance (instances belong to one group at a time)."""
    insts: set[int] = set()
    for st in members:
        insts.update(state.kv.holders(st.rid))
    g = DecodeGroup(gid=state.next_id(), instances=insts)
    for st in members:
        g.requests[st.rid] = None
        st.group = g.gid
    state.groups[g.gid] = g
    merge = {o for i in insts if (o := state.owner[i]) is not None}
    for gid in sorted(merge):
        other = state.groups.pop(gid)
        assert other.running_batch is None, "merging into a running group"
        g.instances |= other.instances
        g.paused_by |= other.paused_by
        g.steps_since_borrow = min(g.steps_since_borrow, other.steps_since_borrow)
        for rid in other.requests:
            g.requests[rid] = None
            state.requests[rid].group = g.gid
    for i in g.instances:
        state.owner[i] = g.gid
