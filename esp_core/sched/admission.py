"""Step 1, admission: which waiting requests to prefill now.

* `PeakMemoryCheck` is the memory check (docs/architecture.md §4): sort resident + candidate
  requests by remaining output descending, index them i = 1..n, and require
  ``max_i(remaining_i * i + Σ_{j<=i} current_len_j) <= capacity`` -- the peak KV demand if
  every request runs to its budget (when request i finishes, the i requests with at
  least its remaining output are alive and each grew by remaining_i). Checking one
  candidate is O(1) while an upper bound of the peak shows it fits, else O(n log n)
  once (sort, prefix/suffix maxima) then O(log n); admitting one is O(1) (queued).
* `admit_fcfs` scans the queue in order with a bounded skip-ahead: a request that
  does not fit blocks; later requests may pass it, but each blocked request can be
  passed at most `max_skip_ahead` times (then nothing passes it: no starvation).
  Scanning stops at the time budget (estimated prefill time of the admitted set), the
  request cap, or after `max_scan` requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


class MemoryCheck(Protocol):
    """What admission asks of a memory check (`PeakMemoryCheck`, or a test's reference)."""

    def fits(self, remaining: int, current_len: int) -> bool: ...

    def add(self, remaining: int, current_len: int) -> None: ...


class PeakMemoryCheck:
    """The memory check over resident requests plus the ones admitted so far.

    Built lazily, because one admission round checks and admits up to hundreds of
    requests against thousands of residents and most checks are far from the limit:

    * `_bound` is an upper bound of the current peak. Adding (r, c) raises the peak by
      at most r + c: entries before its sorted position keep their term, entries after
      it (remaining <= r) gain their remaining + c <= r + c, and its own term is at most
      its predecessor's + r + c. So `fits` answers True from the bound when bound + r +
      c <= capacity, and only otherwise sorts and evaluates exactly -- same answer.
    * `add` queues the entry; the sorted arrays are rebuilt once when an exact answer is
      needed (a stable sort of residents then additions in order gives the order of
      inserting each after every entry with remaining >= its own).
    """

    def __init__(self, remaining: Sequence[int], current_len: Sequence[int], capacity: int) -> None:
        self.capacity = int(capacity)
        self._rem = np.asarray(remaining, dtype=np.int64)
        self._cur = np.asarray(current_len, dtype=np.int64)
        self._pending: list[tuple[int, int]] = []
        self._built = False
        self._load: Callable[[], tuple[Sequence[int], Sequence[int]]] | None = None
        n = len(self._rem)
        # peak = max_i(rem_i * i + prefix_i) <= max(rem) * n + Σ cur
        self._bound = int(self._rem.max()) * n + int(self._cur.sum()) if n else 0

    @classmethod
    def deferred(
        cls, load: Callable[[], tuple[Sequence[int], Sequence[int]]], bound: int, capacity: int
    ) -> PeakMemoryCheck:
        """The same check with the resident arrays gathered by `load()` only when an
        exact answer is needed; `bound` must be an upper bound of their peak (e.g.
        max remaining * n + Σ current_len, with any upper bound of the max)."""
        self = cls.__new__(cls)
        self.capacity = int(capacity)
        self._rem = self._cur = np.zeros(0, dtype=np.int64)
        self._pending = []
        self._built = False
        self._load = load
        self._bound = int(bound)
        return self

    def _materialise(self) -> None:
        if self._built and not self._pending:
            return
        if self._load is not None:
            loaded_rem, loaded_cur = self._load()
            self._rem = np.asarray(loaded_rem, dtype=np.int64)
            self._cur = np.asarray(loaded_cur, dtype=np.int64)
            self._load = None
        rem, cur = self._rem, self._cur
        if self._pending:
            extra = np.asarray(self._pending, dtype=np.int64).reshape(-1, 2)
            rem = np.concatenate((rem, extra[:, 0]))
            cur = np.concatenate((cur, extra[:, 1]))
            self._pending = []
        order = np.argsort(-rem, kind="stable")
        self._rem = rem[order]
        self._cur = cur[order]
        self._rebuild()
        self._built = True
        self._bound = int(self._terms.max()) if len(self._terms) else 0

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
        self._sufmax = (
            np.concatenate((np.maximum.accumulate(shifted[::-1])[::-1], [-1])) if n else np.array([-1])
        )

    @property
    def peak(self) -> int:
        """Peak demand of the current set (0 when empty)."""
        self._materialise()
        return self._bound

    def _insert_pos(self, remaining: int) -> int:
        # after every entry with remaining >= candidate's (stable)
        return int(np.searchsorted(self._neg_rem, -remaining, side="right"))

    def peak_with(self, remaining: int, current_len: int) -> int:
        self._materialise()
        p = self._insert_pos(remaining)
        own = remaining * (p + 1) + int(self._prefix_excl[p]) + current_len
        before = int(self._prefmax[p])
        after = int(self._sufmax[p]) + current_len if self._sufmax[p] >= 0 else -1
        return max(own, before, after)

    def fits(self, remaining: int, current_len: int) -> bool:
        if remaining >= 0 and current_len >= 0 and self._bound + remaining + current_len <= self.capacity:
            return True  # the exact peak is at most this bound
        return self.peak_with(remaining, current_len) <= self.capacity

    def add(self, remaining: int, current_len: int) -> None:
        if remaining < 0 or current_len < 0:
            self._materialise()  # the bound argument needs non-negative entries
            self._pending.append((remaining, current_len))
            self._materialise()
            return
        self._pending.append((int(remaining), int(current_len)))
        self._bound += int(remaining) + int(current_len)


class Candidate(NamedTuple):
    """A waiting request as admission sees it (a tuple: one is built per scanned
    request, and a frozen dataclass costs several times more to build)."""

    rid: str
    length: int  # tokens to prefill (and keep)
    remaining: int  # output budget left
    times_passed: int = 0


@dataclass(frozen=True)
class AdmissionResult:
    admitted: tuple[str, ...]
    passed: tuple[tuple[str, int], ...]  # (blocked request, times passed in this call)
    blocked: tuple[str, ...]


def admit_fcfs(
    queue: Iterable[Candidate],
    check: MemoryCheck,
    room: int,
    *,
    max_skip_ahead: int,
    max_requests: int,
    max_scan: int,
    time_fn: Callable[[int, int], float] | None = None,
    max_time_s: float = float("inf"),
) -> AdmissionResult:
    """Admit requests in FCFS order with bounded skip-ahead.

    `room`: KV slots available to this round's prefills (free slots of the instances
    they may use); `time_fn(ΣL, ΣL²)`: estimated prefill time of a set, for the budget.
    The first admitted request ignores the time budget (something must run).
    """
    admitted: list[str] = []
    blocked: list[Candidate] = []
    passes: dict[str, int] = {}
    sum_len = sum_sq = 0
    for scanned, cand in enumerate(queue):
        if scanned >= max_scan or len(admitted) >= max_requests:
            break
        fits = cand.length <= room - sum_len and check.fits(cand.remaining, cand.length)
        if not fits:
            blocked.append(cand)
            if max_skip_ahead <= 0:
                break
            continue
        if blocked and any(b.times_passed + passes.get(b.rid, 0) >= max_skip_ahead for b in blocked):
            break  # passing would exceed a blocked request's skip-ahead allowance
        square = cand.length * cand.length
        if admitted and time_fn is not None and time_fn(sum_len + cand.length, sum_sq + square) > max_time_s:
            break
        admitted.append(cand.rid)
        check.add(cand.remaining, cand.length)
        sum_len += cand.length
        sum_sq += square
        for b in blocked:
            passes[b.rid] = passes.get(b.rid, 0) + 1
    return AdmissionResult(tuple(admitted), tuple(passes.items()), tuple(b.rid for b in blocked))
