"""The plan's rule on request state, checked (a part of plan_check.py's `check_plan`).

Every instance of a batch knows each of its requests: it had the request's state before
the plan, or a `RequestJoin` of this plan names it (and `new_requests` carries the
request). A join names only instances that lack the request and run one of its batches
in the plan. A decode item's `output_prefix` is either empty, when every instance of the
batch has recorded all outputs before the input token, or exactly those outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn, Protocol

from esp_core.sched.plan import IterationPlan, PrefillItem


class _Broken(Exception):
    pass


class KnownView(Protocol):
    """What the check reads of a request (plan_check.RequestView)."""

    @property
    def prompt_len(self) -> int: ...
    @property
    def outputs(self) -> tuple[int, ...]: ...
    @property
    def known(self) -> Mapping[int, int]:  # instance -> outputs it has recorded (it has the state)
        ...


def _fail(msg: str) -> NoReturn:
    raise _Broken(msg)


def join_error(plan: IterationPlan, requests: Mapping[str, KnownView]) -> str | None:
    """What breaks the rule first, or None (plan_check raises PlanError with it)."""
    try:
        _check_joins(plan, requests)
    except _Broken as e:
        return str(e)
    return None


def _check_joins(plan: IterationPlan, requests: Mapping[str, KnownView]) -> None:
    known = _after_joins(plan, requests)
    for pb in plan.prefills:
        for pit in pb.items:
            _check_knows(known, pit.request_id, pb.instances, pb.batch_id)
            _learn_extra_outputs(
                known[pit.request_id], pit, pb.instances, requests[pit.request_id].prompt_len
            )
    for db in plan.decodes:
        for dit in db.items:
            rid = dit.request_id
            _check_knows(known, rid, db.instances, db.batch_id)
            view = requests[rid]
            before = dit.position - view.prompt_len  # outputs before the input token
            if dit.output_prefix:
                if tuple(dit.output_prefix) != tuple(view.outputs[:before]):
                    _fail(f"{rid}: output_prefix {dit.output_prefix} != outputs[:{before}]")
            else:
                short = [i for i in db.instances if known[rid][i] < before]
                if short:
                    _fail(f"{rid}: instances {short} lack outputs before {before} and no output_prefix")
            for i in db.instances:
                known[rid][i] = before + 1


def _after_joins(plan: IterationPlan, requests: Mapping[str, KnownView]) -> dict[str, dict[int, int]]:
    """Who knows each request of the plan once its joins are applied."""
    sent = {r.request_id for r in plan.new_requests}
    joined = {j.request_id for j in plan.joins}
    if sent != joined:
        _fail(f"new_requests {sorted(sent)} != requests joined {sorted(joined)}")
    runs_on: dict[str, set[int]] = {}
    for b in plan.batches():
        for it in b.items:
            runs_on.setdefault(it.request_id, set()).update(b.instances)
    known: dict[str, dict[int, int]] = {}
    for rid in runs_on:
        if rid not in requests:
            _fail(f"batch of unknown request {rid}")
        known[rid] = dict(requests[rid].known)
    for j in plan.joins:
        per = known.get(j.request_id)
        if per is None:
            _fail(f"join of {j.request_id}, which no batch of the plan runs")
        for i in j.instances:
            if i in per:
                _fail(f"{j.request_id} sent again to instance {i}, which knows it")
            if i not in runs_on[j.request_id]:
                _fail(f"{j.request_id} sent to instance {i}, which runs none of its batches")
            per[i] = 0
    return known


def _check_knows(
    known: dict[str, dict[int, int]], rid: str, instances: tuple[int, ...], batch_id: int
) -> None:
    missing = [i for i in instances if i not in known[rid]]
    if missing:
        _fail(f"batch {batch_id}: instances {missing} do not know {rid} and the plan does not send it")


def _learn_extra_outputs(
    per: dict[int, int], it: PrefillItem, ring: tuple[int, ...], prompt_len: int
) -> None:
    """Re-prefilled outputs are recorded where they extend what a ring instance knows."""
    if not it.extra_token_ids:
        return
    first = max(it.tokens.start, prompt_len) - prompt_len
    end = it.tokens.end - prompt_len
    for i in ring:
        if first <= per[i] < end:
            per[i] = end
