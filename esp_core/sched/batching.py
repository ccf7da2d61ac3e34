"""Step 3, batching: split admitted requests into prefill batches by interval DP.

Requests are sorted by length (descending) and instances by free slots (descending).
`f[i][k]` is the least total normalised latency (Σ over requests of T_batch / L) of the
first i requests on (a subset of) the first k instances, each batch taking the next run
of requests and a contiguous run of instances::

    f[i][k] = min( f[i][k-1],                                   # instance k left idle
                   min_{b, c} f[i-b][k-c] + T_{dop}(ΣL, ΣL²) · Σ 1/L )   # last batch

subject to the batch's ΣL fitting the free slots of its instances (minus a per-instance
headroom for decode growth). Prefix sums make each term O(1).

Bounding (LoongServe's split-point pruning is a heuristic under the KV constraint; we do
not use it): when there are more than `max_request_groups` requests, adjacent requests
(in length order) are bundled into groups of about equal total length -- long requests
stay alone, short ones share -- and more than `max_instance_groups` instances are bundled
into equal-size groups of adjacent instances. The DP then runs over groups, vectorised
over (b, k, c) with numpy: O(R · R·G²) elements for R request groups, G instance groups.
Without bundling it is the exhaustive DP; tests/support/sched_reference.py states it in
plain loops, and tests/sched/test_batching.py measures what bundling loses.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchAssignment:
    requests: tuple[int, ...]  # indices into the caller's request list
    instances: tuple[int, ...]  # indices into the caller's instance list
    dop: int
    est_time_s: float


@dataclass(frozen=True)
class BatchingResult:
    batches: tuple[BatchAssignment, ...]
    cost: float  # Σ normalised latency (s / token)


def _group_bounds_by_log_length(lengths: np.ndarray, max_groups: int) -> np.ndarray:
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
    depth = logs[0] - logs  # log-distance from the longest, computed once for the search

    def buckets(width: float) -> np.ndarray:
        # whole numbers below 2**41 (depth <= span, width >= span / 2**40): exact as
        # floats, so comparing them is comparing the integer buckets
        return np.floor(depth / width)  # non-decreasing

    lo, hi = 0.0, span + 1e-9  # width hi gives one run
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid > 0:
            bk = buckets(mid)
            if np.count_nonzero(bk[1:] != bk[:-1]) + 1 <= max_groups:
                hi = mid
                continue
        lo = mid
    bk = buckets(hi)
    return np.concatenate(([0], np.flatnonzero(bk[1:] != bk[:-1]) + 1, [n]))


def _equal_count_bounds(n: int, max_groups: int) -> np.ndarray:
    g = min(n, max_groups)
    return np.round(np.linspace(0, n, g + 1)).astype(np.int64)


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    free_slots: Sequence[int] | np.ndarray,
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    max_request_groups: int = 24,
    max_instance_groups: int = 32,
    headroom: int = 0,
) -> BatchingResult | None:
    """Best split of requests into batches on contiguous instance runs, or None when
    the requests cannot all fit. `coeffs` = (a, b, c) arrays indexed by DoP."""
    n, K = len(lengths), len(free_slots)
    if n == 0:
        return BatchingResult((), 0.0)
    if K == 0:
        return None
    a_arr, b_arr, c_arr = coeffs
    if len(a_arr) <= K:
        raise ValueError("coefficient arrays must cover DoP up to the number of instances")
    req_order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    L = np.asarray(lengths, dtype=np.float64)[req_order]
    inst_order = np.argsort(-np.asarray(free_slots, dtype=np.int64), kind="stable")
    free = np.maximum(np.asarray(free_slots, dtype=np.float64)[inst_order] - headroom, 0.0)

    rb = _group_bounds_by_log_length(L, max_request_groups)  # request group bounds
    ib = _equal_count_bounds(K, max_instance_groups)  # instance group bounds
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

    f, take_b, take_c = _dp_table(R, G, P1, P2, Pinv, dop, room, kc, (a_d, b_d, c_d), rows)
    if not np.isfinite(f[R, G]):
        return None
    batches = _walk_back(take_b, take_c, (rb, req_order, L), (ib, inst_order), coeffs)
    return BatchingResult(tuple(batches), float(f[R, G]))


def _walk_back(
    take_b: np.ndarray,
    take_c: np.ndarray,
    req_groups: tuple[np.ndarray, np.ndarray, np.ndarray],
    inst_groups: tuple[np.ndarray, np.ndarray],
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> list[BatchAssignment]:
    """The batches of the optimum, read back from the full DP table: from the last batch's
    request groups and instance groups (`take_b`, `take_c` at [i, k]) to the first."""
    rb, req_order, lengths = req_groups  # group bounds, sorted order, sorted lengths
    ib, inst_order = inst_groups
    batches: list[BatchAssignment] = []
    i, k = len(rb) - 1, len(ib) - 1
    while i > 0:
        b = int(take_b[i, k])
        if b == 0:
            k -= 1
            continue
        c = int(take_c[i, k])
        requests = req_order[int(rb[i - b]) : int(rb[i])]
        instances = inst_order[int(ib[k - c]) : int(ib[k])]
        batches.append(_assignment(requests, instances, lengths[int(rb[i - b]) : int(rb[i])], coeffs))
        i, k = i - b, k - c
    batches.reverse()
    return batches


def _assignment(
    requests: np.ndarray,
    instances: np.ndarray,
    seg: np.ndarray,
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> BatchAssignment:
    """One batch: `seg` are its requests' lengths; its time at DoP = len(instances)."""
    a_arr, b_arr, c_arr = coeffs
    d = len(instances)
    t = float(a_arr[d] + b_arr[d] * seg.sum() + c_arr[d] * (seg * seg).sum())
    return BatchAssignment(
        requests=tuple(requests.tolist()), instances=tuple(instances.tolist()), dop=d, est_time_s=t
    )


@functools.lru_cache(maxsize=64)
def _pairs(R: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DP's (i, b) pairs, 1 <= b <= i <= R, row-major: i per pair, b per pair, and
    the index of pair (i, 1) for i = 1..R (read-only)."""
    i, b = np.tril_indices(R)
    out = (i + 1, b + 1, np.concatenate(([0], np.cumsum(np.arange(1, R + 1)))))
    for a in out:
        a.flags.writeable = False
    return out


def _dp_table(
    R: int,
    G: int,
    P1: np.ndarray,
    P2: np.ndarray,
    Pinv: np.ndarray,
    dop: np.ndarray,
    room: np.ndarray,
    kc: np.ndarray,
    coeffs_d: tuple[np.ndarray, np.ndarray, np.ndarray],
    rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DP table f [R+1, G+1] with the argmins to backtrack: take_b[i, k] request
    groups in the last batch (0: instance group k left idle), on take_c[i, k] instance
    groups. Every (i, b) pair's last-batch cost is computed up front, so each row is a
    few numpy calls (tables are small: a round's pool is usually a few instances)."""
    a_d, b_d, c_d = coeffs_d
    pi, pb, offsets = _pairs(R)
    S1 = P1[pi] - P1[pi - pb]
    S2 = P2[pi] - P2[pi - pb]
    Sinv = Pinv[pi] - Pinv[pi - pb]
    with np.errstate(invalid="ignore"):
        cost_bd = (a_d[None, :] + b_d[None, :] * S1[:, None] + c_d[None, :] * S2[:, None]) * Sinv[
            :, None
        ]  # [npairs, K+1]
        # a run that is invalid or too small for the batch's KV costs inf (inf + f
        # stays inf: f is never -inf or nan)
        base = cost_bd[:, dop]  # [pair, k, c]
        base[room[None, :, :] < S1[:, None, None]] = np.inf
    # per k, the best (b, c) is the first minimum in (b, c) order (the row form's argmin
    # over c, then over b): in a [k, pair, c] layout, one flat argmin per k
    base = np.ascontiguousarray(base.transpose(1, 0, 2))
    f = np.full((R + 1, G + 1), np.inf)
    f[0, :] = 0.0
    take_b = np.zeros((R + 1, G + 1), dtype=np.int64)  # 0 = instance group k left idle
    take_c = np.zeros((R + 1, G + 1), dtype=np.int64)
    skip = np.zeros(G + 1, dtype=bool)
    for i in range(1, R + 1):
        lo = offsets[i - 1]
        # f[i-b][k-c] for b = 1..i, as [k, b, c]
        cand = base[:, lo : lo + i, :] + f[i - 1 :: -1][:, kc].transpose(1, 0, 2)
        flat = cand.reshape(G + 1, i * (G + 1))
        j = flat.argmin(axis=1)  # [G+1]
        best = flat[rows, j]
        bi, ci = np.divmod(j, G + 1)
        # allow leaving instance group k idle: f[i][k] = min(f[i][k-1], best[k])
        run_min = np.minimum.accumulate(best)
        np.less_equal(run_min[:-1], best[1:], out=skip[1:])
        f[i] = run_min
        take_b[i] = np.where(skip, 0, bi + 1)
        take_c[i] = ci
    return f, take_b, take_c
