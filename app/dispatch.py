"""Split an IterationPlan into per-instance sub-plans, and merge per-instance results.

Pure functions + a small bookkeeping class (no Ray), so the controller's event loop stays
a thin shell and this part is unit-tested alone.

* `sub_plan(plan, i, ...)` keeps what concerns instance i: the batches it takes part in,
  the new requests those batches start (and, once, any request i has not seen yet),
  releases naming it (narrowed to it), prefix-cache adoptions naming it and
  migrations from or to it. Decode items get `output_prefix` filled when the instance has
  not seen every earlier output token of the request (a new master or holder).
* `ResultCombiner` collects the results of a batch from all its instances and returns
  the combined `BatchResult` once the last one arrived: union of sampled tokens, the
  largest elapsed time, the first error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    NewRequest,
    PrefillBatch,
)


@dataclass
class OutputHistory:
    """Which output tokens each instance has seen, per request (for `output_prefix`)."""

    prompt_len: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    seen: dict[tuple[str, int], int] = field(default_factory=dict)  # outputs known there
    # the request itself, re-sent to an instance that joins its decode without having
    # taken part in its prefill (a new master after a merge or scale-up)
    requests: dict[str, NewRequest] = field(default_factory=dict)

    def add_request(self, request_id: str, prompt_len: int, request: NewRequest | None = None) -> None:
        self.prompt_len[request_id] = prompt_len
        self.outputs[request_id] = []
        if request is not None:
            self.requests[request_id] = request

    def record(self, request_id: str, token_id: int) -> None:
        if request_id in self.outputs:
            self.outputs[request_id].append(token_id)

    def forget(self, request_id: str) -> None:
        self.prompt_len.pop(request_id, None)
        self.outputs.pop(request_id, None)
        self.requests.pop(request_id, None)
        for key in [k for k in self.seen if k[0] == request_id]:
            del self.seen[key]

    def knows(self, request_id: str, instance: int) -> bool:
        return (request_id, instance) in self.seen

    def decode_item_for(self, item: DecodeItem, instance: int) -> DecodeItem:
        """The item as instance `instance` must receive it."""
        rid = item.request_id
        before = item.position - self.prompt_len.get(rid, item.position)  # outputs before input
        known = self.seen.get((rid, instance))
        self.seen[(rid, instance)] = before + 1  # after this step it knows input_token too
        if known == before or before <= 0 or item.output_prefix:
            return item
        prefix = tuple(self.outputs.get(rid, ())[:before])
        return dataclasses.replace(item, output_prefix=prefix)

    def prefill_on(self, request_id: str, instance: int, extra_ids: int) -> None:
        # a prefilling instance learns the prompt and the re-prefilled outputs (extra ids)
        key = (request_id, instance)
        self.seen[key] = max(self.seen.get(key, 0), extra_ids)


def sub_plan(
    plan: IterationPlan, instance: int, history: OutputHistory | None = None
) -> IterationPlan | None:
    """The part of `plan` instance `instance` executes, or None when nothing concerns it."""
    prefills = tuple(b for b in plan.prefills if instance in b.instances)
    decodes: list[DecodeBatch] = []
    resend: dict[str, NewRequest] = {}

    def resend_if_unknown(request_id: str) -> None:
        # The scheduler sends a NewRequest once, with the request's first prefill; an
        # instance that joins it later (a re-prefill after preemption, a later chunk on
        # another ring, a new decode master) must get it from here, exactly once.
        req = history.requests.get(request_id)
        if req is not None and not history.knows(request_id, instance):
            resend[request_id] = req

    if history is not None:
        for b in prefills:
            for it in b.items:
                resend_if_unknown(it.request_id)
    for b in plan.decodes:
        if instance not in b.instances:
            continue
        if history is not None:
            for it in b.items:
                resend_if_unknown(it.request_id)
            b = dataclasses.replace(b, items=tuple(history.decode_item_for(it, instance) for it in b.items))
        decodes.append(b)
    releases = tuple(
        dataclasses.replace(r, instances=(instance,)) for r in plan.releases if instance in r.instances
    )
    migrations = tuple(m for m in plan.migrations if instance in (m.src, m.dst))
    adoptions = tuple(a for a in plan.adoptions if instance in a.instances)
    if not (prefills or decodes or releases or migrations or adoptions):
        return None
    started = {it.request_id for b in prefills for it in b.items}
    started.update(resend)
    if history is not None:
        for b in prefills:
            for it in b.items:
                history.prefill_on(it.request_id, instance, len(it.extra_token_ids))
    new_requests = tuple(r for r in plan.new_requests if r.request_id in started)
    given = {r.request_id for r in new_requests}
    new_requests += tuple(r for rid, r in resend.items() if rid not in given)
    return IterationPlan(
        plan_id=plan.plan_id,
        new_requests=new_requests,
        prefills=prefills,
        decodes=tuple(decodes),
        migrations=migrations,
        releases=releases,
        paused=plan.paused,
        adoptions=adoptions,
    )


def batch_kind(batch: PrefillBatch | DecodeBatch) -> str:
    return "prefill" if isinstance(batch, PrefillBatch) else "decode"


class ResultCombiner:
    """Collects one BatchResult per instance of each batch; yields the merged result."""

    def __init__(self) -> None:
        self._expected: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._parts: dict[int, dict[int, BatchResult]] = {}

    def expect(self, batch: PrefillBatch | DecodeBatch) -> None:
        self._expected[batch.batch_id] = (batch_kind(batch), tuple(batch.instances))
        self._parts[batch.batch_id] = {}

    def add(self, instance: int, result: BatchResult) -> BatchResult | None:
        if result.batch_id not in self._expected:
            raise KeyError(f"result for unknown batch {result.batch_id}")
        parts = self._parts[result.batch_id]
        parts[instance] = result
        kind, instances = self._expected[result.batch_id]
        if set(parts) != set(instances):
            return None
        del self._expected[result.batch_id]
        del self._parts[result.batch_id]
        ordered = [parts[i] for i in instances]
        sampled = tuple(s for r in ordered for s in r.sampled)
        errors = [f"instance {i}: {parts[i].error}" for i in instances if parts[i].error]
        return BatchResult(
            result.batch_id,
            kind,
            instances,
            sampled,
            elapsed_s=max(r.elapsed_s for r in ordered),
            error="; ".join(errors) or None,
        )

    def fail(self, instance: int, batch_id: int, error: str) -> BatchResult | None:
        """The instance could not run the batch (e.g. it died): an error result for it."""
        kind, _ = self._expected[batch_id]
        return self.add(instance, BatchResult(batch_id, kind, (instance,), error=error))

    def pending(self) -> int:
        return len(self._expected)
