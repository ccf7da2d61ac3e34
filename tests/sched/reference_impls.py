"""Slow reference copies of scheduler internals that were optimised for decision time
(docs/bench-scheduler.md), kept verbatim (modulo bookkeeping the fast code added) so
tests can check the fast code decides exactly the same.

`reference_code()` swaps every reference in; tests run the same scenario with and
without it and compare every emitted plan.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np

import esp_core.sched.scheduler as scheduler_mod
from esp_core.sched.kv_accounting import KVAccounting, KVOvercommit, merge_ranges
from esp_core.sched.plan import TokenRange


class ReferenceKVAccounting(KVAccounting):
    """KV accounting as first written: totals summed from the array on every query,
    placement checked pairwise against every held range and re-merged."""

    @property
    def total_free(self) -> int:
        return int(self.capacity * self.num_instances - self.used.sum())

    def place(self, rid: str, inst: int, ranges: Iterable[TokenRange]) -> None:
        ranges = [r for r in ranges if len(r)]
        n = sum(len(r) for r in ranges)
        if not self.can_place(rid, inst, n):
            raise KVOvercommit(f"place {rid}: {n} slots on instance {inst} "
                               f"(free {int(self.free[inst])}, reserved {self.total_reserved})")
        per_inst = self._ranges.setdefault(rid, {})
        for other, have in per_inst.items():
            for r in ranges:
                for h in have:
                    if h.intersect(r) is not None:
                        raise ValueError(f"{rid}: positions {r} already held on {other}")
        per_inst[inst] = merge_ranges([*per_inst.get(inst, ()), *ranges])
        self.used[inst] += n
        self._used_total = int(self.used.sum())  # (bookkeeping only: the fast code's cache)
        self.unreserve(rid, n)

    def release(self, rid: str) -> tuple[int, ...]:
        self.unreserve(rid)
        per_inst = self._ranges.pop(rid, {})
        for inst, rs in per_inst.items():
            self.used[inst] -= sum(len(r) for r in rs)
        self._used_total = int(self.used.sum())
        return tuple(sorted(per_inst))


@contextlib.contextmanager
def reference_code():
    """Within the block, schedulers created use every reference implementation."""
    patches = [(scheduler_mod, "KVAccounting", ReferenceKVAccounting)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, ref in patches:
            setattr(mod, name, ref)
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


__all__ = ["ReferenceKVAccounting", "reference_code", "np"]
