"""Slow reference copies of scheduler internals that were optimised for decision time
(docs/bench-scheduler.md), kept verbatim (modulo bookkeeping the fast code added) so
tests can check the fast code decides exactly the same.

`reference_code()` swaps every reference in; tests run the same scenario with and
without it and compare every emitted plan.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import numpy as np

import esp_core.sched.batching as batching_mod
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


class ReferencePeakMemoryCheck:
    """The memory check as first written: sorted arrays rebuilt on every admission."""

    def __init__(self, remaining: Sequence[int], current_len: Sequence[int], capacity: int) -> None:
        self.capacity = int(capacity)
        rem = np.asarray(remaining, dtype=np.int64)
        cur = np.asarray(current_len, dtype=np.int64)
        order = np.argsort(-rem, kind="stable")
        self._rem = rem[order]
        self._cur = cur[order]
        self._rebuild()

    def _rebuild(self) -> None:
        rem, cur = self._rem, self._cur
        n = len(rem)
        self._neg_rem = -rem  # ascending, for searchsorted
        prefix = np.cumsum(cur)
        self._prefix_excl = np.concatenate(([0], prefix))  # Σ_{j<i} cur_j, i = 0..n
        terms = rem * np.arange(1, n + 1) + prefix  # [n]
        self._terms = terms
        # prefmax[p] = max term_i for i < p; sufmax[p] = max (term_i + rem_i) for i >= p
        self._prefmax = np.concatenate(([-1], np.maximum.accumulate(terms))) if n else np.array([-1])
        shifted = terms + rem
        self._sufmax = np.concatenate((np.maximum.accumulate(shifted[::-1])[::-1], [-1])) \
            if n else np.array([-1])

    @property
    def peak(self) -> int:
        """Peak demand of the current set (0 when empty)."""
        return int(self._terms.max()) if len(self._terms) else 0

    def _insert_pos(self, remaining: int) -> int:
        # after every entry with remaining >= candidate's (stable)
        return int(np.searchsorted(self._neg_rem, -remaining, side="right"))

    def peak_with(self, remaining: int, current_len: int) -> int:
        p = self._insert_pos(remaining)
        own = remaining * (p + 1) + int(self._prefix_excl[p]) + current_len
        before = int(self._prefmax[p])
        after = int(self._sufmax[p]) + current_len if self._sufmax[p] >= 0 else -1
        return max(own, before, after)

    def fits(self, remaining: int, current_len: int) -> bool:
        return self.peak_with(remaining, current_len) <= self.capacity

    def add(self, remaining: int, current_len: int) -> None:
        p = self._insert_pos(remaining)
        self._rem = np.concatenate((self._rem[:p], [remaining], self._rem[p:]))
        self._cur = np.concatenate((self._cur[:p], [current_len], self._cur[p:]))
        self._rebuild()


def reference_group_bounds_by_log_length(lengths: np.ndarray, max_groups: int) -> np.ndarray:
    """Boundaries 0 = b_0 < ... < b_g = n (g <= max_groups) grouping `lengths` (sorted
    descending) into runs of similar length: equal-width buckets of log(length), the
    narrowest width giving at most `max_groups` runs. Similar lengths matter because the
    objective is normalised latency: a short request batched with a long one pays the
    long one's time over its own few tokens."""
    n = len(lengths)
    if n <= max_groups:
        return np.arange(n + 1)
    logs = np.log(lengths)
    span = float(logs[0] - logs[-1])

    def runs(width: float) -> np.ndarray:
        bucket = np.floor((logs[0] - logs) / width).astype(np.int64)  # non-decreasing
        return np.flatnonzero(np.diff(bucket)) + 1

    lo, hi = 0.0, span + 1e-9  # width hi gives one run
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid > 0 and len(runs(mid)) + 1 <= max_groups:
            hi = mid
        else:
            lo = mid
    return np.concatenate(([0], runs(hi), [n]))


@contextlib.contextmanager
def reference_code():
    """Within the block, schedulers created use every reference implementation."""
    patches = [(scheduler_mod, "KVAccounting", ReferenceKVAccounting),
               (scheduler_mod, "PeakMemoryCheck", ReferencePeakMemoryCheck),
               (batching_mod, "_group_bounds_by_log_length",
                reference_group_bounds_by_log_length)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, ref in patches:
            setattr(mod, name, ref)
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


__all__ = ["ReferenceKVAccounting", "ReferencePeakMemoryCheck", "reference_code",
           "reference_group_bounds_by_log_length"]
