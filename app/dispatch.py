"""Split an IterationPlan into per-instance sub-plans, and merge per-instance results.

Pure functions and a small collector (no Ray), so the controller's event loop stays a
thin shell and this part is unit-tested alone.

* `sub_plan(plan, i)` narrows the plan to instance i and changes nothing else: the
  batches it takes part in, the new requests its joins name, releases, joins and
  prefix-cache adoptions naming it (narrowed to it), migrations from or to it. What an
  instance lacks (a request it joins, earlier outputs) the scheduler's plan says.
* `ResultCombiner` collects the results of a batch from all its instances and returns
  the combined `BatchResult` once the last one arrived: union of sampled tokens, the
  largest elapsed time, the first error.
"""

from __future__ import annotations

import dataclasses

from esp_core.sched.plan import BatchResult, DecodeBatch, IterationPlan, PrefillBatch


def sub_plan(plan: IterationPlan, instance: int) -> IterationPlan | None:
    """The part of `plan` instance `instance` executes, or None when nothing concerns it."""
    prefills = tuple(b for b in plan.prefills if instance in b.instances)
    decodes = tuple(b for b in plan.decodes if instance in b.instances)
    releases = tuple(
        dataclasses.replace(r, instances=(instance,)) for r in plan.releases if instance in r.instances
    )
    migrations = tuple(m for m in plan.migrations if instance in (m.src, m.dst))
    adoptions = tuple(a for a in plan.adoptions if instance in a.instances)
    if not (prefills or decodes or releases or migrations or adoptions):
        return None
    joins = tuple(
        dataclasses.replace(j, instances=(instance,)) for j in plan.joins if instance in j.instances
    )
    joined = {j.request_id for j in joins}
    return IterationPlan(
        plan_id=plan.plan_id,
        new_requests=tuple(r for r in plan.new_requests if r.request_id in joined),
        prefills=prefills,
        decodes=decodes,
        migrations=migrations,
        releases=releases,
        paused=plan.paused,
        adoptions=adoptions,
        joins=joins,
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
