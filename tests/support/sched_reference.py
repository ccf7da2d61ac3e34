"""Plain reference implementations of the scheduler's fast paths, for tests.

* `ReferenceKVAccounting`: KV accounting as first written -- totals summed from the
  array on every query, placement checked pairwise against every held range.
* `ReferencePeakMemoryCheck`: the admission memory check with its sorted arrays rebuilt
  on every admission (no upper bound, no lazy loading).
* `peak_demand_reference`: the memory check's formula in plain Python.
* `interval_dp_reference`: the batching DP, exhaustive, in plain loops.

`reference_algorithms()` gives the scheduler's `Algorithms` with the references in:
`ESPScheduler(cluster, cost, config, algorithms=reference_algorithms())` must emit the
same plans as the shipped code (tests/sched/test_fast_paths.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from esp_core.sched.kv_accounting import KVAccounting, KVOvercommit, merge_ranges
from esp_core.sched.plan import TokenRange
from esp_core.sched.scheduler_state import Algorithms


class ReferenceKVAccounting(KVAccounting):
    @property
    def total_free(self) -> int:
        return int(self.capacity * self.num_instances - self.used.sum())

    def place(self, rid: str, inst: int, ranges: Iterable[TokenRange]) -> None:
        ranges = [r for r in ranges if len(r)]
        n = sum(len(r) for r in ranges)
        if not self.can_place(rid, inst, n):
            raise KVOvercommit(
                f"place {rid}: {n} slots on instance {inst} "
                f"(free {int(self.free[inst])}, reserved {self.total_reserved})"
            )
        per_inst = self._ranges.setdefault(rid, {})
        for other, have in per_inst.items():
            for r in ranges:
                for h in have:
                    if h.intersect(r) is not None:
                        raise ValueError(f"{rid}: positions {r} already held on {other}")
        per_inst[inst] = merge_ranges([*per_inst.get(inst, ()), *ranges])
        self.used[inst] += n
        self._used_total = int(self.used.sum())  # (only the shipped class's cache)
        self.unreserve(rid, n)

    def release(self, rid: str) -> tuple[int, ...]:
        self.unreserve(rid)
        per_inst = self._ranges.pop(rid, {})
        for inst, rs in per_inst.items():
            self.used[inst] -= sum(len(r) for r in rs)
        self._used_total = int(self.used.sum())
        return tuple(sorted(per_inst))


class ReferencePeakMemoryCheck:
    def __init__(self, remaining: Sequence[int], current_len: Sequence[int], capacity: int) -> None:
        self.capacity = int(capacity)
        self.entries = sorted(zip(remaining, current_len), key=lambda e: -e[0])  # stable

    @classmethod
    def deferred(
        cls, load: Callable[[], tuple[Sequence[int], Sequence[int]]], bound: int, capacity: int
    ) -> ReferencePeakMemoryCheck:
        rem, cur = load()  # (eagerly: the reference has no bound to answer from)
        return cls(rem, cur, capacity)

    @property
    def peak(self) -> int:
        return peak_demand_reference([r for r, _ in self.entries], [c for _, c in self.entries])

    def peak_with(self, remaining: int, current_len: int) -> int:
        rem = [r for r, _ in self.entries] + [remaining]
        cur = [c for _, c in self.entries] + [current_len]
        return peak_demand_reference(rem, cur)

    def fits(self, remaining: int, current_len: int) -> bool:
        return self.peak_with(remaining, current_len) <= self.capacity

    def add(self, remaining: int, current_len: int) -> None:
        self.entries = sorted([*self.entries, (remaining, current_len)], key=lambda e: -e[0])


def peak_demand_reference(remaining: Sequence[int], current_len: Sequence[int]) -> int:
    """Sort by remaining output, descending; the peak KV demand if every request runs to
    its budget is max_i(remaining_i * i + Σ_{j<=i} current_len_j) (0 when empty)."""
    pairs = sorted(zip(remaining, current_len), key=lambda x: -x[0])
    best, acc = 0, 0
    for i, (rem, cur) in enumerate(pairs, 1):
        acc += cur
        best = max(best, rem * i + acc)
    return best


def interval_dp_reference(
    lengths: Sequence[int],
    free_slots: Sequence[int],
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    headroom: int = 0,
) -> float:
    """The exhaustive batching DP in plain loops (no bundling); returns the optimal cost
    (inf when infeasible)."""
    a_arr, b_arr, c_arr = coeffs
    L = sorted((float(x) for x in lengths), reverse=True)
    free = sorted((max(float(x) - headroom, 0.0) for x in free_slots), reverse=True)
    n, K = len(L), len(free)
    INF = float("inf")
    f = [[INF] * (K + 1) for _ in range(n + 1)]
    for k in range(K + 1):
        f[0][k] = 0.0
    for i in range(1, n + 1):
        for k in range(1, K + 1):
            best = f[i][k - 1]
            for b in range(1, i + 1):
                seg = L[i - b : i]
                s1, s2, sinv = sum(seg), sum(x * x for x in seg), sum(1.0 / x for x in seg)
                for c in range(1, k + 1):
                    if sum(free[k - c : k]) < s1 or f[i - b][k - c] == INF:
                        continue
                    t = (a_arr[c] + b_arr[c] * s1 + c_arr[c] * s2) * sinv
                    best = min(best, f[i - b][k - c] + t)
            f[i][k] = best
    return f[n][K]


def reference_algorithms() -> Algorithms:
    return Algorithms(kv_accounting=ReferenceKVAccounting, memory_check=ReferencePeakMemoryCheck.deferred)
