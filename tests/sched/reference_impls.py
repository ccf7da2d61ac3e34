"""Slow reference copies of scheduler internals that were optimised for decision time
(docs/bench-scheduler.md), kept verbatim (modulo bookkeeping the fast code added) so
tests can check the fast code decides exactly the same.

`reference_code()` swaps every reference in; tests run the same scenario with and
without it and compare every emitted plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np

import esp_core.sched.batching as batching_mod
import esp_core.sched.scheduler as scheduler_mod
from esp_core.sched.kv_accounting import KVAccounting, KVOvercommit, merge_ranges
from esp_core.sched.plan import KVKeep, TokenRange


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

    @classmethod
    def deferred(cls, load, bound: int, capacity: int) -> ReferencePeakMemoryCheck:
        rem, cur = load()  # (the fast code's lazy construction: here, eager)
        return cls(rem, cur, capacity)

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


def reference_plan_batches(
    lengths: Sequence[int],
    free_slots: Sequence[int],
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    max_request_groups: int = 24,
    max_instance_groups: int = 32,
    headroom: int = 0,
) -> batching_mod.BatchingResult | None:
    """`plan_batches` as first vectorised: one DP row at a time, a few dozen numpy
    calls per row (the shipped one computes every (i, b) pair's costs up front and
    takes one flat argmin per instance group)."""
    n, K = len(lengths), len(free_slots)
    if n == 0:
        return batching_mod.BatchingResult((), 0.0)
    if K == 0:
        return None
    a_arr, b_arr, c_arr = coeffs
    if len(a_arr) <= K:
        raise ValueError("coefficient arrays must cover DoP up to the number of instances")
    req_order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    L = np.asarray(lengths, dtype=np.float64)[req_order]
    inst_order = np.argsort(-np.asarray(free_slots, dtype=np.int64), kind="stable")
    free = np.maximum(np.asarray(free_slots, dtype=np.float64)[inst_order] - headroom, 0.0)

    rb = reference_group_bounds_by_log_length(L, max_request_groups)  # request group bounds
    ib = batching_mod._equal_count_bounds(K, max_instance_groups)  # instance group bounds
    R, G = len(rb) - 1, len(ib) - 1
    P1 = np.concatenate(([0.0], np.cumsum(L)))[rb]  # [R+1]
    P2 = np.concatenate(([0.0], np.cumsum(L * L)))[rb]
    Pinv = np.concatenate(([0.0], np.cumsum(1.0 / L)))[rb]
    FS = np.concatenate(([0.0], np.cumsum(free)))[ib]  # [G+1] free-slot prefix
    SZ = ib.astype(np.int64)  # [G+1] instance-count prefix

    k_idx = np.arange(G + 1)[:, None]  # [G+1, 1]
    c_idx = np.arange(G + 1)[None, :]  # [1, G+1]
    valid = (c_idx >= 1) & (c_idx <= k_idx)  # [G+1, G+1] (k, c)
    kc = np.where(valid, k_idx - c_idx, 0)  # start group of the last batch
    dop = np.where(valid, SZ[k_idx] - SZ[kc], 0)  # [G+1, G+1]
    room = np.where(valid, FS[k_idx] - FS[kc], -1.0)  # free slots of the run (-1: invalid)
    dops = np.arange(K + 1)
    a_d, b_d, c_d = a_arr[dops], b_arr[dops], c_arr[dops]  # [K+1]
    rows = np.arange(G + 1)

    f = np.full((R + 1, G + 1), np.inf)
    f[0, :] = 0.0
    take_b = np.zeros((R + 1, G + 1), dtype=np.int64)  # 0 = instance group k left idle
    take_c = np.zeros((R + 1, G + 1), dtype=np.int64)
    with np.errstate(invalid="ignore"):
        for i in range(1, R + 1):
            bs = np.arange(1, i + 1)  # [i]
            S1 = P1[i] - P1[i - bs]  # [i]
            S2 = P2[i] - P2[i - bs]
            Sinv = Pinv[i] - Pinv[i - bs]
            # cost depends on (b, dop) only: compute it on [i, K+1], gather on (k, c)
            cost_bd = (a_d[None, :] + b_d[None, :] * S1[:, None] + c_d[None, :] * S2[:, None]) * Sinv[
                :, None
            ]  # [i, K+1]
            cand = cost_bd[:, dop]  # [i, G+1, G+1]
            cand += f[i - bs][:, kc]  # f[i-b][k-c]
            cand[room[None, :, :] < S1[:, None, None]] = np.inf  # KV must fit (and c <= k)
            ci_all = cand.argmin(axis=2)  # [i, G+1]: best c per (b, k)
            m1 = np.take_along_axis(cand, ci_all[:, :, None], axis=2)[:, :, 0]  # [i, G+1]
            bi = m1.argmin(axis=0)  # [G+1]
            best = m1[bi, rows]
            ci = ci_all[bi, rows]
            # allow leaving instance group k idle: f[i][k] = min(f[i][k-1], best[k])
            run_min = np.minimum.accumulate(best)
            skip = np.zeros(G + 1, dtype=bool)
            skip[1:] = run_min[:-1] <= best[1:]
            f[i] = run_min
            take_b[i] = np.where(skip, 0, bi + 1)
            take_c[i] = ci
    if not np.isfinite(f[R, G]):
        return None
    batches: list = []
    i, k = R, G
    while i > 0:
        b = int(take_b[i, k])
        if b == 0:
            k -= 1
            continue
        c = int(take_c[i, k])
        r_lo, r_hi = int(rb[i - b]), int(rb[i])
        g_lo, g_hi = int(ib[k - c]), int(ib[k])
        seg = L[r_lo:r_hi]
        d = g_hi - g_lo
        t = float(a_arr[d] + b_arr[d] * seg.sum() + c_arr[d] * (seg * seg).sum())
        batches.append(
            batching_mod.BatchAssignment(
                requests=tuple(int(x) for x in req_order[r_lo:r_hi]),
                instances=tuple(int(x) for x in inst_order[g_lo:g_hi]),
                dop=d,
                est_time_s=t,
            )
        )
        i, k = i - b, k - c
    batches.reverse()
    return batching_mod.BatchingResult(tuple(batches), float(f[R, G]))


def reference_place_keeps(
    tokens: TokenRange,
    candidates: Sequence[int],
    free: np.ndarray,
    *,
    headroom: int = 0,
    prefer: Sequence[int] = (),
) -> tuple[KVKeep, ...] | None:
    """`place_keeps` as first written (min with a key, the preferred pool always built)."""
    need = len(tokens)
    if need == 0:
        return ()
    cands = list(dict.fromkeys(candidates))
    if not cands:
        return None
    # 1. whole fit, preferred instances first, fullest first
    for pool in (list(dict.fromkeys(p for p in prefer if p in cands)), cands):
        fitting = [i for i in pool if free[i] >= need + headroom]
        if fitting:
            inst = min(fitting, key=lambda i: (free[i], i))
            free[inst] -= need
            return (KVKeep(inst, (tokens,)),)
    # 2. split: emptiest first, keeping the headroom where possible, then without it
    order = sorted(cands, key=lambda i: (-free[i], i))
    total = sum(int(free[i]) for i in order)
    if total < need:
        return None
    spare = sum(max(int(free[i]) - headroom, 0) for i in order)
    reserve = headroom if spare >= need else 0
    keeps: list[KVKeep] = []
    pos = tokens.start
    for inst in order:
        take = min(int(free[inst]) - reserve, tokens.end - pos)
        if take <= 0:
            continue
        keeps.append(KVKeep(inst, (TokenRange(pos, pos + take),)))
        free[inst] -= take
        pos += take
        if pos == tokens.end:
            break
    assert pos == tokens.end
    return tuple(keeps)


@contextlib.contextmanager
def reference_code():
    """Within the block, schedulers created use every reference implementation."""
    patches = [
        (scheduler_mod, "KVAccounting", ReferenceKVAccounting),
        (scheduler_mod, "PeakMemoryCheck", ReferencePeakMemoryCheck),
        (batching_mod, "_group_bounds_by_log_length", reference_group_bounds_by_log_length),
        (scheduler_mod, "plan_batches", reference_plan_batches),
        (scheduler_mod, "place_keeps", reference_place_keeps),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, ref in patches:
            setattr(mod, name, ref)
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


__all__ = [
    "ReferenceKVAccounting",
    "ReferencePeakMemoryCheck",
    "reference_code",
    "reference_group_bounds_by_log_length",
    "reference_place_keeps",
    "reference_plan_batches",
]
