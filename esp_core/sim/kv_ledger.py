"""The simulator's own record of where every request's KV lives, and plan validation.

The simulator does not trust the scheduler's bookkeeping: it replays every plan onto
this ledger (what a real group of instances would hold) and refuses a plan that would
run a batch on a busy instance, over-commit an instance's KV slots, put a request in two
running batches at once, or describe KV holders that do not match reality. That is how
the tests prove "never over-commits KV" for every policy, including the baselines.
"""

from __future__ import annotations

from collections import defaultdict

from esp_core.sched.plan import (
    DecodeBatch,
    IterationPlan,
    KVAdoption,
    Migration,
    PrefillBatch,
    PrefillItem,
    Release,
)


class PlanError(RuntimeError):
    """A plan that no executor could run (the scheduler has a bug)."""


class KVLedger:
    """Tokens of KV per (request, instance), and per-instance occupancy."""

    def __init__(self, num_instances: int, capacity: int) -> None:
        self.num_instances = num_instances
        self.capacity = capacity
        self.used = [0] * num_instances
        self.peak = [0] * num_instances
        self._by_request: dict[str, dict[int, int]] = defaultdict(dict)
        # Prefix-cache tokens a request attends to but does not own (a baseline's shared
        # cache blocks, its own accounting): read by decode attention, not counted in `used`.
        self._shared: dict[str, dict[int, int]] = {}

    # -- queries -----------------------------------------------------------------------

    def tokens(self, request_id: str, instance: int) -> int:
        return self._by_request.get(request_id, {}).get(instance, 0)

    def read_tokens(self, request_id: str, instance: int) -> int:
        """KV tokens of the request that attention reads on `instance`: its own + shared."""
        return self.tokens(request_id, instance) + self._shared.get(request_id, {}).get(instance, 0)

    def holders(self, request_id: str) -> set[int]:
        return {i for i, n in self._by_request.get(request_id, {}).items() if n > 0}

    def request_tokens(self, request_id: str) -> int:
        return sum(self._by_request.get(request_id, {}).values())

    def is_empty(self) -> bool:
        return not any(self.used)

    # -- mutations ---------------------------------------------------------------------

    def add(self, request_id: str, instance: int, n: int, what: str) -> None:
        if not 0 <= instance < self.num_instances:
            raise PlanError(f"{what}: instance {instance} does not exist")
        if self.used[instance] + n > self.capacity:
            raise PlanError(
                f"{what}: instance {instance} over-committed: {self.used[instance]} + {n} "
                f"> {self.capacity} slots"
            )
        per = self._by_request[request_id]
        per[instance] = per.get(instance, 0) + n
        self.used[instance] += n
        self.peak[instance] = max(self.peak[instance], self.used[instance])

    def remove(self, request_id: str, instance: int, n: int, what: str) -> None:
        have = self.tokens(request_id, instance)
        if n > have:
            raise PlanError(f"{what}: {request_id} has {have} tokens on {instance}, not {n}")
        per = self._by_request[request_id]
        per[instance] = have - n
        if per[instance] == 0:
            del per[instance]
        if not per:
            del self._by_request[request_id]
        self.used[instance] -= n

    def add_shared(self, request_id: str, instance: int, n: int) -> None:
        per = self._shared.setdefault(request_id, {})
        per[instance] = per.get(instance, 0) + n

    def release(self, rel: Release) -> None:
        self._shared.pop(rel.request_id, None)
        for inst in rel.instances:
            n = self.tokens(rel.request_id, inst)
            if n:
                self.remove(rel.request_id, inst, n, f"release {rel.request_id}")

    def adopt(self, ad: KVAdoption) -> None:
        """A prefix-cache hit: the source's KV on each instance becomes what `kept`
        says the destination keeps there; the rest is freed (a copy: the destination
        gets `kept` more, the source stays)."""
        # a copy reads the instances holding the source's [0, keep_len) (a live source
        # may hold later positions elsewhere); an adoption takes all of the entry
        held = self.holders(ad.src_rid)
        if not (set(ad.instances) <= held if ad.copy else held == set(ad.instances)):
            raise PlanError(
                f"adoption of {ad.src_rid} on {ad.instances}, KV on {sorted(self.holders(ad.src_rid))}"
            )
        if self.request_tokens(ad.dst_rid):
            raise PlanError(f"adoption into {ad.dst_rid}, which already holds KV")
        kept = {k.instance: k.num_tokens for k in ad.kept}
        if sum(kept.values()) != ad.keep_len:
            raise PlanError(f"adoption {ad.src_rid} -> {ad.dst_rid}: keeps do not cover [0, {ad.keep_len})")
        what = f"adoption {ad.src_rid} -> {ad.dst_rid}"
        for inst in ad.instances if not ad.copy else ():  # (a copy leaves the source)
            self.remove(ad.src_rid, inst, self.tokens(ad.src_rid, inst), what)
        for inst, n in kept.items():
            if ad.copy and (inst not in ad.instances or n > self.tokens(ad.src_rid, inst)):
                raise PlanError(f"{what}: copies {n} tokens on {inst}, the source holds fewer there")
            if n:
                self.add(ad.dst_rid, inst, n, what)

    def migrate(self, mig: Migration) -> int:
        n = sum(len(r) for r in mig.ranges)
        what = f"migration {mig.request_id} {mig.src}->{mig.dst}"
        self.remove(mig.request_id, mig.src, n, what)
        self.add(mig.request_id, mig.dst, n, what)
        return n


def check_prefill_item(batch: PrefillBatch, item: PrefillItem) -> None:
    """Keep ranges partition the chunk exactly and name instances of the ring."""
    ranges = sorted((r for k in item.keep for r in k.ranges), key=lambda r: r.start)
    pos = item.tokens.start
    for r in ranges:
        if r.start != pos:
            raise PlanError(
                f"prefill {batch.batch_id}/{item.request_id}: keep ranges do not "
                f"partition {item.tokens} (gap or overlap at {pos})"
            )
        pos = r.end
    if pos != item.tokens.end:
        raise PlanError(
            f"prefill {batch.batch_id}/{item.request_id}: keep ranges end at {pos}, "
            f"chunk ends at {item.tokens.end}"
        )
    for k in item.keep:
        if k.instance not in batch.instances:
            raise PlanError(
                f"prefill {batch.batch_id}/{item.request_id}: keep instance "
                f"{k.instance} not in ring {batch.instances}"
            )
    if len(set(batch.instances)) != len(batch.instances):
        raise PlanError(f"prefill {batch.batch_id}: ring repeats an instance")


def check_decode_batch(batch: DecodeBatch, ledger: KVLedger) -> None:
    seen: set[str] = set()
    for it in batch.items:
        if it.request_id in seen:
            raise PlanError(f"decode {batch.batch_id}: {it.request_id} twice")
        seen.add(it.request_id)
        if it.master not in batch.instances or it.new_kv_instance not in batch.instances:
            raise PlanError(
                f"decode {batch.batch_id}/{it.request_id}: master "
                f"{it.master} / new KV instance {it.new_kv_instance} outside "
                f"{batch.instances}"
            )
        actual = ledger.holders(it.request_id)
        if set(it.holders) != actual:
            raise PlanError(
                f"decode {batch.batch_id}/{it.request_id}: holders {it.holders} "
                f"but KV lives on {sorted(actual)}"
            )
        if not set(it.holders) <= set(batch.instances):
            raise PlanError(f"decode {batch.batch_id}/{it.request_id}: holder outside batch")


def plan_summary(plan: IterationPlan) -> str:
    return (
        f"plan {plan.plan_id}: {len(plan.prefills)} prefills, {len(plan.decodes)} decodes, "
        f"{len(plan.migrations)} migrations, {len(plan.releases)} releases"
    )
