"""The simulator's own record of where every request's KV lives, and plan validation.

The simulator does not trust the scheduler's bookkeeping: it replays every plan onto
this ledger (what a real group of instances would hold) and refuses a plan that would
run a batch on a busy instance, over-commit an instance's KV slots, put a request in two
running batches at once, or describe KV holders that do not match reality. That is how
the tests prove "never over-commits KV" for every policy, including the baselines.

Shared prefix-cache KV (`KVAdoption(share=True)`) is replayed too: a share turns the
source's own tokens below `keep_len` into a shared segment (counted once) that every
reader holds; a segment's slots are freed with its last holder. A decode step reads a
segment once for all its readers in the step (`step_read_tokens`: the executors' cascade
attention, docs/esp-execution.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from esp_core.sched.plan import (
    DecodeBatch,
    IterationPlan,
    KVAdoption,
    Migration,
    PrefillBatch,
    PrefillItem,
    Release,
    TokenRange,
)


class PlanError(RuntimeError):
    """A plan that no executor could run (the scheduler has a bug)."""


@dataclass
class _Segment:
    """Shared KV of positions [start, end): slots per instance, and who holds them."""

    start: int
    end: int
    per_instance: dict[int, int]
    holders: set[str] = field(default_factory=set)


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
        self._chains: dict[str, list[_Segment]] = {}  # request -> its segments, by position

    # -- queries -----------------------------------------------------------------------

    def tokens(self, request_id: str, instance: int) -> int:
        """KV tokens the request holds on `instance`, its own and shared."""
        own = self._by_request.get(request_id, {}).get(instance, 0)
        return own + sum(g.per_instance.get(instance, 0) for g in self._chains.get(request_id, ()))

    def own_tokens(self, request_id: str, instance: int) -> int:
        return self._by_request.get(request_id, {}).get(instance, 0)

    def read_tokens(self, request_id: str, instance: int) -> int:
        """KV tokens of the request that attention reads on `instance`: its own + shared."""
        return self.tokens(request_id, instance) + self._shared.get(request_id, {}).get(instance, 0)

    def step_read_tokens(self, request_ids: Iterable[str], instance: int) -> int:
        """KV tokens one decode step of `request_ids` reads on `instance` with shared-prefix
        (cascade) attention: each request's own and baseline-shared tokens, plus every
        shared segment any of them holds, once for all its readers in the step."""
        total = 0
        seen: set[int] = set()
        for rid in request_ids:
            total += self.own_tokens(rid, instance) + self._shared.get(rid, {}).get(instance, 0)
            for g in self._chains.get(rid, ()):
                if id(g) not in seen:
                    seen.add(id(g))
                    total += g.per_instance.get(instance, 0)
        return total

    def holders(self, request_id: str) -> set[int]:
        own = {i for i, n in self._by_request.get(request_id, {}).items() if n > 0}
        return own.union(*(g.per_instance for g in self._chains.get(request_id, ())))

    def request_tokens(self, request_id: str) -> int:
        own = sum(self._by_request.get(request_id, {}).values())
        return own + sum(g.end - g.start for g in self._chains.get(request_id, ()))

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
        have = self.own_tokens(request_id, instance)
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
            n = self.own_tokens(rel.request_id, inst)
            if n:
                self.remove(rel.request_id, inst, n, f"release {rel.request_id}")
        self._let_go(rel.request_id)

    def _let_go(self, request_id: str) -> None:
        """The request no longer holds its segments; each one it held last is freed."""
        for seg in self._chains.pop(request_id, ()):
            seg.holders.discard(request_id)
            if not seg.holders:
                for inst, n in seg.per_instance.items():
                    self.used[inst] -= n

    def adopt(self, ad: KVAdoption) -> None:
        """A prefix-cache hit: the destination holds the source's tokens below
        `keep_len` where `kept` says (shared: the same slots, counted once); an adoption
        then lets go of the source (its other tokens are freed)."""
        # a share reads the instances holding the source's [0, keep_len) (a live source
        # may hold later positions elsewhere); an adoption takes all of the entry
        held = self.holders(ad.src_rid)
        if not (set(ad.instances) <= held if ad.share else held == set(ad.instances)):
            raise PlanError(
                f"adoption of {ad.src_rid} on {ad.instances}, KV on {sorted(self.holders(ad.src_rid))}"
            )
        if self.request_tokens(ad.dst_rid):
            raise PlanError(f"adoption into {ad.dst_rid}, which already holds KV")
        kept = {k.instance: k.num_tokens for k in ad.kept}
        what = f"adoption {ad.src_rid} -> {ad.dst_rid}"
        if sum(kept.values()) != ad.keep_len:
            raise PlanError(f"{what}: keeps do not cover [0, {ad.keep_len})")
        for inst, n in kept.items():
            if inst not in ad.instances or n > self.tokens(ad.src_rid, inst):
                raise PlanError(f"{what}: keeps {n} tokens on {inst}, the source holds fewer there")
        if ad.share or ad.src_rid in self._chains:
            self._share(ad, what)
        else:  # an adoption of KV nobody shares: the kept tokens change owner
            for inst, n in kept.items():
                self.remove(ad.src_rid, inst, n, what)
                self.add(ad.dst_rid, inst, n, what)
        if not ad.share:
            for inst in ad.instances:
                n = self.own_tokens(ad.src_rid, inst)
                if n:
                    self.remove(ad.src_rid, inst, n, what)
            self._let_go(ad.src_rid)

    def _share(self, ad: KVAdoption, what: str) -> None:
        """The destination holds the source's segments below `keep_len`; the source's own
        tokens between its last segment and `keep_len` become a new segment first."""
        chain = self._chains.setdefault(ad.src_rid, [])
        end = chain[-1].end if chain else 0
        if ad.keep_len < end and ad.keep_len not in {g.end for g in chain}:
            raise PlanError(f"{what}: [0, {ad.keep_len}) splits a shared segment")
        if ad.keep_len > end:
            span = TokenRange(end, ad.keep_len)
            moved = {k.instance: sum(len(x) for r in k.ranges if (x := r.intersect(span))) for k in ad.kept}
            moved = {i: n for i, n in moved.items() if n}
            for inst, n in moved.items():
                if n > self.own_tokens(ad.src_rid, inst):
                    raise PlanError(f"{what}: shares {n} tokens on {inst}, the source owns fewer")
                self.remove(ad.src_rid, inst, n, what)
                self.used[inst] += n  # (still held: by the segment now)
            chain.append(_Segment(end, ad.keep_len, moved, {ad.src_rid}))
        if not chain:
            del self._chains[ad.src_rid]
        taken = [g for g in chain if g.end <= ad.keep_len]
        for g in taken:
            g.holders.add(ad.dst_rid)
        self._chains[ad.dst_rid] = taken

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
