"""Who knows what of each request: the plan's joins and decode items' output prefixes.

An instance executes a batch item only if it has the request's state (prompt ids,
sampling parameters, the outputs so far: esp_core/runtime/request_state.py). The
scheduler keeps, per request, which instances have that state and how many outputs each
has recorded (`SchedulerRequest.known`), and writes into the plan what each one lacks:

* a `RequestJoin` (and the request's `NewRequest`) for every instance of a batch that
  does not have the request yet: the first prefill ring, a re-prefill or chunk on other
  instances, a new master or holder after a decode merge, a migration or a scale-up;
* `DecodeItem.output_prefix` (all outputs before the input token) when an instance of
  the decode batch has not recorded them all.

`send_what_is_missing` runs once per `schedule()` call, after every batch is planned,
in plan order (prefills, then decodes): the order in which each instance applies them.
"""

from __future__ import annotations

import dataclasses

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.plan import DecodeBatch, DecodeItem, PrefillItem, RequestJoin
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import SchedulerRequest


def send_what_is_missing(state: SchedulerState, plan: PlanBuilder) -> None:
    joining: dict[str, list[int]] = {}  # request id -> instances joining it, in order
    for pb in plan.prefills:
        for it in pb.items:
            st = state.requests[it.request_id]
            _join(st, pb.instances, joining)
            _learn_extra_outputs(st, it, pb.instances)
    plan.decodes[:] = [_decode_batch_sent(state, db, joining) for db in plan.decodes]
    given = {r.request_id for r in plan.new_requests}
    for rid, instances in joining.items():
        plan.joins.append(RequestJoin(rid, tuple(instances)))
        if rid not in given:  # (a first prefill already put it there)
            plan.new_requests.append(state.requests[rid].req)


def _join(st: SchedulerRequest, instances: tuple[int, ...], joining: dict[str, list[int]]) -> None:
    for i in instances:
        if i not in st.known:
            st.known[i] = 0
            joining.setdefault(st.rid, []).append(i)


def _learn_extra_outputs(st: SchedulerRequest, it: PrefillItem, ring: tuple[int, ...]) -> None:
    """A (re-)prefill chunk records the outputs it carries (`extra_token_ids`) where they
    extend what the instance knows (esp_core/runtime: chunk_ids, chunk_token_ids)."""
    if not it.extra_token_ids:
        return
    first = max(it.tokens.start, st.prompt_len) - st.prompt_len  # output index of the first extra
    end = it.tokens.end - st.prompt_len
    for i in ring:
        if first <= st.known[i] < end:
            st.known[i] = end


def _decode_batch_sent(state: SchedulerState, db: DecodeBatch, joining: dict[str, list[int]]) -> DecodeBatch:
    items = [_decode_item_sent(state.requests[it.request_id], it, db, joining) for it in db.items]
    if all(new is old for new, old in zip(items, db.items)):
        return db
    return dataclasses.replace(db, items=tuple(items))


def _decode_item_sent(
    st: SchedulerRequest, it: DecodeItem, db: DecodeBatch, joining: dict[str, list[int]]
) -> DecodeItem:
    """Every instance of the batch records the outputs before `input_token` (from
    `output_prefix` where one lacks some), then `input_token` itself. (One pass over the
    batch's instances: this runs for every decode item of every step.)"""
    before = it.position - st.prompt_len  # outputs before the input token
    known = st.known
    lacking = False
    for i in db.instances:
        n = known.get(i)
        if n is None:  # joins now: knows none of the outputs
            joining.setdefault(st.rid, []).append(i)
            n = 0
        lacking = lacking or n < before
        known[i] = before + 1
    if not lacking:
        return it
    return dataclasses.replace(it, output_prefix=tuple(st.outputs[:before]))
