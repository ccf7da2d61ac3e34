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
not use it). Optimal splits have many small batches -- often about one per instance, at
DoP 1-4 -- so instances stay exact and the DP bounds the other two dimensions:

* requests: more than `max_request_groups` (default min(64, 4·K)) are bundled into runs
  of adjacent requests of about equal count; a batch is a run of whole groups.
* batch options: a batch spans at most `max_batch_groups` groups (default max(2,
  2·R/K): twice an instance's share), and only DoPs worth trying are kept -- a DoP c is
  dropped when it never fits or when a smaller DoP that fits anywhere is no slower. That
  pruning is exact (f is non-increasing in k), and it keeps ~8 DoPs per batch with the
  A800 model (beyond a node the cross-node penalty makes a bigger DoP slower).

Equal-count groups express batches of whole groups only, and at most R of them, so with
the default bounds three repairs follow: when min(64, 4·K) is not a multiple of K the DP
also runs with the largest multiple of K below it (uniform lengths want ~n/K requests
per instance) and the better plan is kept; batches are split in two where that is
cheaper (`_split_batches`: 512 requests on 256 instances want 256 batches, 64 groups
give 64); and each cut between adjacent batches may move by up to a group's worth of
requests (`_shift_cuts`). Explicit bounds give that DP alone, without repairs.

The DP loops over the R request-group rows, each one numpy step over [options ending at
the row, K+1]. With `max_request_groups` >= n and `max_batch_groups` >= n it is the
exhaustive DP; tests/support/sched_reference.py states that in plain loops, and
tests/sched/test_batching.py measures what the bounds lose (0% on its random rounds,
<1% on benchmark-shaped ones; 0.2% at 512 x 256 against the best plan found offline).
Weakest seen: ~6% at 256 log-uniform requests x 100 instances.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_REQUEST_GROUPS = 64  # default cap on the DP's rows (with 4 per instance): time
SPAN_MIN = 2  # by default a batch may always span this many request groups (more
# costs time and, measured on uniform and log-uniform rounds, gained nothing)


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


def _request_group_bounds(lengths: np.ndarray, max_groups: int) -> np.ndarray:
    """Boundaries 0 = b_0 < ... < b_g = n (g <= max_groups) of runs of adjacent requests
    (sorted descending) of about equal count. Equal counts, not log-length buckets: the
    optimum of a round with many requests is mostly DoP-1 batches of about n/K requests
    each, which equal-count runs express at any batch size up to the run length."""
    n = len(lengths)
    return _equal_count_bounds(n, min(n, max_groups))


@functools.lru_cache(maxsize=4096)
def _equal_count_bounds(n: int, groups: int) -> np.ndarray:
    # cached: a round asks for the same few (n, groups) pairs again and again, and
    # linspace + round cost ~80 us, as much as several DP rows (read-only: shared)
    bounds = np.round(np.linspace(0, n, groups + 1)).astype(np.int64)
    bounds.flags.writeable = False
    return bounds


def _batch_options(
    sums: tuple[np.ndarray, np.ndarray, np.ndarray],
    free: np.ndarray,
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    max_span: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every last batch worth trying: (i, b, c) = the b request groups ending at group i
    on c instances, in (i, b, c) order. A DoP c is dropped when it never fits, or when
    some c' < c that fits on any c' instances runs the batch no slower (c' instances
    ending at the same place leave f no worse: f is non-increasing in k), so dropping
    is exact. Returns i, b, c, cost (= T_c · Σ1/L) and ΣL per option [M]."""
    P1, P2, Pinv = sums  # [R+1] prefix sums over request groups
    R, K = len(P1) - 1, len(free)
    a_arr, b_arr, c_arr = coeffs
    span = min(max_span, R)
    i = np.repeat(np.arange(1, R + 1), span)  # [R·span] pairs (i, b), b = 1..span
    b = np.tile(np.arange(1, span + 1), R)
    ok = b <= i
    i, b = i[ok], b[ok]
    S1, S2, Sinv = P1[i] - P1[i - b], P2[i] - P2[i - b], Pinv[i] - Pinv[i - b]
    d = np.arange(1, K + 1)
    T = a_arr[d][None, :] + b_arr[d][None, :] * S1[:, None] + c_arr[d][None, :] * S2[:, None]  # [pairs, K]
    fits_worst = np.cumsum(free[::-1])[None, :] >= S1[:, None]  # on the c smallest instances
    fits_best = np.cumsum(free)[None, :] >= S1[:, None]  # on the c largest
    best_before = np.minimum.accumulate(np.where(fits_worst, T, np.inf), axis=1)
    dominated = np.zeros_like(fits_worst)
    dominated[:, 1:] = T[:, 1:] >= best_before[:, :-1]
    p, c = np.nonzero(fits_best & ~dominated)  # row-major: (i, b, c) order
    return i[p], b[p], c + 1, T[p, c] * Sinv[p], S1[p]


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    free_slots: Sequence[int] | np.ndarray,
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    max_request_groups: int | None = None,
    max_batch_groups: int | None = None,
    headroom: int = 0,
) -> BatchingResult | None:
    """Best split of requests into batches on contiguous instance runs, or None when
    the requests cannot all fit. `coeffs` = (a, b, c) arrays indexed by DoP."""
    n, K = len(lengths), len(free_slots)
    if n == 0:
        return BatchingResult((), 0.0)
    if K == 0:
        return None
    if len(coeffs[0]) <= K:
        raise ValueError("coefficient arrays must cover DoP up to the number of instances")
    req_order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    L = np.asarray(lengths, dtype=np.float64)[req_order]
    inst_order = np.argsort(-np.asarray(free_slots, dtype=np.int64), kind="stable")
    free = np.maximum(np.asarray(free_slots, dtype=np.float64)[inst_order] - headroom, 0.0)
    if L.sum() > free.sum():
        return None  # no split fits (saves the bounded DP's unbounded retry below)

    if max_request_groups is not None:
        group_counts: tuple[int, ...] = (max_request_groups,)
    else:
        group_counts = _default_group_counts(n, K)
    best: tuple[float, np.ndarray, np.ndarray] | None = None  # cost, times, spans
    for groups in group_counts:
        # explicit bounds: that DP alone (configs use them to force coarse batches)
        repair = max_request_groups is None
        spans = _solve(L, free, coeffs, groups, max_batch_groups, repair)  # [m, 4] or None
        if spans is None:
            continue
        times, cost = _batch_times(spans, L, coeffs)
        if best is None or cost < best[0]:  # first wins ties: deterministic
            best = (cost, times, spans)
    if best is None:
        return None
    cost, times, spans = best
    batches = (
        BatchAssignment(
            requests=tuple(req_order[lo:hi].tolist()),
            instances=tuple(inst_order[ilo:ihi].tolist()),
            dop=ihi - ilo,
            est_time_s=t,
        )
        for (lo, hi, ilo, ihi), t in zip(spans.tolist(), times.tolist())
    )
    return BatchingResult(tuple(batches), cost)


def _batch_times(
    spans: np.ndarray, L: np.ndarray, coeffs: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, float]:
    """Each batch's time [m] and the plan's Σ T · Σ1/L, from sums over each batch's own
    lengths (not prefix-sum differences, whose rounding grows with the prefix). The
    batches cover the sorted requests in order, so their starts cut L into them."""
    a_arr, b_arr, c_arr = coeffs
    starts, d = spans[:, 0], spans[:, 3] - spans[:, 2]
    s1, s2, sinv = (np.add.reduceat(x, starts) for x in (L, L * L, 1.0 / L))
    times = a_arr[d] + b_arr[d] * s1 + c_arr[d] * s2
    return times, float((times * sinv).sum())


def _default_group_counts(n: int, K: int) -> tuple[int, ...]:
    """The request-group counts to solve with, best result kept. Enough groups to express
    ~K batches (the optimum often uses every instance): min(64, 4K); and, when that is
    not a multiple of K, also the largest multiple of K up to it -- with uniform lengths
    the optimum is ~n/K requests per instance, which groups of ~n/(mK) requests express
    and groups of other sizes do not (measured: 5-7% lost, e.g. 300 requests x 48)."""
    first = min(MAX_REQUEST_GROUPS, 4 * K)
    if n <= first:
        return (n,)  # every request its own group
    aligned = K * (first // K)
    return (first,) if aligned in (0, first) else (first, aligned)


def _solve(
    L: np.ndarray,
    free: np.ndarray,
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    groups: int,
    max_batch_groups: int | None,
    repair: bool,
) -> np.ndarray | None:
    """The DP over `groups` request groups, then (`repair`) batches split and cuts moved
    off the group bounds: the batches as [m, 4] spans (see `_walk_back`), or None when
    nothing fits."""
    n, K = len(L), len(free)
    rb = _request_group_bounds(L, groups)  # [R+1] group bounds
    R = len(rb) - 1
    # [n+1] request prefix sums (and [K+1] free slots'), for the groups and the repairs
    prefix = tuple(np.concatenate(([0.0], np.cumsum(x))) for x in (L, L * L, 1.0 / L, free))
    sums = (prefix[0][rb], prefix[1][rb], prefix[2][rb])
    # a batch spans up to ~2 groups per instance's share of the requests
    span = max(SPAN_MIN, -(-2 * R // K)) if max_batch_groups is None else max_batch_groups
    span = min(span, R)
    while True:
        options = _batch_options(sums, free, coeffs, span)
        f_end, take = _dp_table(R, free, options)
        # a bounded span can make a crowded round look infeasible: then try every span
        if np.isfinite(f_end) or span >= R:
            break
        span = R
    if not np.isfinite(f_end):
        return None
    spans = _walk_back(take, options, rb)  # [m, 4]
    if repair and R < n:  # bundled: more batches, and cuts off the group bounds
        spans = _split_batches(spans, prefix, coeffs)  # type: ignore[arg-type]
        _shift_cuts(spans, prefix, coeffs, reach=-(-n // R))  # type: ignore[arg-type]
    return spans


def _batch_cost(
    lo: np.ndarray,
    hi: np.ndarray,
    ilo: np.ndarray,
    ihi: np.ndarray,
    prefix: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """T · Σ1/L of requests [lo, hi) on instances [ilo, ihi) (sorted positions, arrays
    of one shape), inf where the KV does not fit or a side is empty."""
    P1, P2, Pinv, FS = prefix
    a_arr, b_arr, c_arr = coeffs
    d = np.maximum(ihi - ilo, 1)
    s1 = P1[hi] - P1[lo]
    t = (a_arr[d] + b_arr[d] * s1 + c_arr[d] * (P2[hi] - P2[lo])) * (Pinv[hi] - Pinv[lo])
    return np.where((s1 <= FS[ihi] - FS[ilo]) & (hi > lo) & (ihi > ilo), t, np.inf)


def _split_batches(
    spans: np.ndarray,
    prefix: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    passes: int = 4,
) -> np.ndarray:
    """Splits batches in two (requests at any point, instances at any point) where that
    is cheaper, repeatedly: with fewer request groups than instances the DP can make at
    most R batches, while the optimum often has about one per instance (512 requests on
    256 instances: 256 batches of 2 at DoP 1, where 64 groups give 64 batches of 8 at
    DoP 4). All batches at once, over [batch, request cut, instance cut]."""
    for _ in range(passes):
        lo, hi, ilo, ihi = (spans[:, x][:, None, None] for x in range(4))  # [m, 1, 1]
        q = lo + 1 + np.arange(int((spans[:, 1] - spans[:, 0]).max()) - 1)[None, :, None]
        e = ilo + 1 + np.arange(int((spans[:, 3] - spans[:, 2]).max()) - 1)[None, None, :]
        if q.shape[1] == 0 or e.shape[2] == 0:
            break
        # [m, Q, 1] and [m, 1, E]; a cut past a batch's end leaves a side empty (inf)
        qc, ec = np.minimum(q, hi), np.minimum(e, ihi)
        split = _batch_cost(lo, qc, ilo, ec, prefix, coeffs) + _batch_cost(qc, hi, ec, ihi, prefix, coeffs)
        now = _batch_cost(spans[:, 0], spans[:, 1], spans[:, 2], spans[:, 3], prefix, coeffs)
        flat = split.reshape(len(spans), -1)  # [m, Q·E]
        j = flat.argmin(axis=1)
        better = flat[np.arange(len(spans)), j] < now * (1 - 1e-12)
        if not better.any():
            break
        jq, je = np.divmod(j, split.shape[2])
        cut_q, cut_e = spans[:, 0] + 1 + jq, spans[:, 2] + 1 + je  # (finite: both sides real)
        count = 1 + better  # rows per batch after the pass
        at = np.cumsum(count) - count  # where each batch's first row lands
        out = np.repeat(spans, count, axis=0)
        out[at[better], 1], out[at[better], 3] = cut_q[better], cut_e[better]
        out[at[better] + 1, 0], out[at[better] + 1, 2] = cut_q[better], cut_e[better]
        spans = out
    return spans


def _dp_table(R: int, free: np.ndarray, options: tuple[np.ndarray, ...]) -> tuple[float, np.ndarray]:
    """f[R][K] and the table to backtrack: take[i, k] = the option (index into `options`)
    that is the last batch of the best split of the first i request groups on the first
    k instances, -1 when instance k is left idle. One row per request group, vectorised
    over (option, k); options are few because each spans few groups at few useful DoPs."""
    opt_i, opt_b, opt_c, opt_cost, opt_s1 = options  # [M] each, sorted by i
    K = len(free)
    pad = int(opt_c.max()) if len(opt_c) else 1  # inf columns left of k = 0
    W = pad + K + 1
    fpad = np.full((R + 1, W), np.inf)  # f[i][k] at [i, pad + k]
    fpad[0, pad:] = 0.0
    flat = fpad.reshape(-1)  # a view: rows written below are read by later rows
    ks = np.arange(K + 1)
    # [M, K+1] flat index of f[i - b][k - c]; k < c lands in the inf padding
    idx = ((opt_i - opt_b) * W + pad - opt_c)[:, None] + ks[None, :]
    # a run too small for the batch's KV: point at an inf cell instead. Only options
    # that do not fit on the c smallest instances can miss (runs are sorted descending)
    FS = np.concatenate(([0.0], np.cumsum(free)))
    tight = np.flatnonzero(np.cumsum(free[::-1])[opt_c - 1] < opt_s1)
    if len(tight):
        start = ks[None, :] - opt_c[tight][:, None]  # [tight, K+1]
        room = FS[ks][None, :] - FS[np.maximum(start, 0)]
        idx[tight] = np.where((start >= 0) & (room >= opt_s1[tight][:, None]), idx[tight], 0)
    # options of row i: [off[i-1], off[i]) (plain ints: read twice per row)
    offsets = np.searchsorted(opt_i, np.arange(1, R + 2)).tolist()
    take = np.zeros((R + 1, K + 1), dtype=np.int64)
    idle = np.ones((R + 1, K + 1), dtype=bool)  # instance k left idle (or no option)
    for i in range(1, R + 1):
        o0, o1 = offsets[i - 1], offsets[i]
        if o0 == o1:
            continue  # no batch can end here: the row stays inf
        cand = flat[idx[o0:o1]]  # [m, K+1]
        cand += opt_cost[o0:o1, None]
        j = cand.argmin(axis=0)  # first minimum: options are in (b, c) order
        best = cand[j, ks]
        # or leave instance k idle; written straight into row i (fewer numpy calls per
        # row: they, not the arithmetic, are most of a row's time)
        run_min = np.minimum.accumulate(best, out=fpad[i, pad:])
        np.less_equal(run_min[:-1], best[1:], out=idle[i, 1:])
        np.add(j, o0, out=take[i])
    take[idle] = -1
    return float(fpad[R, -1]), take


def _walk_back(take: np.ndarray, options: tuple[np.ndarray, ...], rb: np.ndarray) -> np.ndarray:
    """The batches of the optimum, read back from the DP table, as [m, 4] rows (first
    request, end request, first instance, end instance) in sorted positions, in order."""
    _, opt_b, opt_c, _, _ = options
    spans: list[tuple[int, int, int, int]] = []
    i, k = len(rb) - 1, take.shape[1] - 1
    while i > 0:
        t = int(take[i, k])
        if t < 0:
            k -= 1
            continue
        b, c = int(opt_b[t]), int(opt_c[t])
        spans.append((int(rb[i - b]), int(rb[i]), k - c, k))
        i, k = i - b, k - c
    return np.array(spans[::-1], dtype=np.int64).reshape(-1, 4)


def _shift_cuts(
    spans: np.ndarray,
    prefix: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    coeffs: tuple[np.ndarray, np.ndarray, np.ndarray],
    reach: int,
    sweeps: int = 4,
) -> None:
    """Moves each cut between two adjacent batches by up to `reach` requests when that
    lowers the pair's cost (DoPs and instances kept, KV checked), in place. Request
    groups can only cut at group bounds; this lets the cuts land between any two
    requests. Even cuts, then odd cuts: cuts of one parity share no batch, so each
    parity is one vectorised step over [cuts, shifts]."""
    P1, P2, Pinv, FS = prefix  # [n+1] request prefix sums, [K+1] free-slot prefix
    a_arr, b_arr, c_arr = coeffs
    dop = spans[:, 3] - spans[:, 2]  # [m]
    room = FS[spans[:, 3]] - FS[spans[:, 2]]
    # shift 0 first: argmin keeps the cut on ties
    shifts = np.concatenate(([0], (np.arange(1, reach + 1)[:, None] * np.array([-1, 1])).ravel()))
    # per parity, what every sweep reuses (DoPs and instances are kept): the cuts, and
    # the coefficients and room of the batches either side of them, as [cuts, 1] columns
    steps = []
    for parity in (0, 1):
        j = np.arange(parity, len(spans) - 1, 2)  # cut j: between batch j and j + 1
        sides = tuple(
            (a_arr[dop[x]][:, None], b_arr[dop[x]][:, None], c_arr[dop[x]][:, None], room[x][:, None])
            for x in (j, j + 1)
        )
        steps.append((j, j + 1, np.arange(len(j)), sides))

    def cost(lo: np.ndarray, hi: np.ndarray, side: tuple[np.ndarray, ...]) -> np.ndarray:
        a_of, b_of, c_of, room_of = side
        s1 = P1[hi] - P1[lo]
        t = (a_of + b_of * s1 + c_of * (P2[hi] - P2[lo])) * (Pinv[hi] - Pinv[lo])
        return np.where(s1 <= room_of, t, np.inf)

    for _ in range(sweeps):
        moved = False
        for j, right, rows, (left_side, right_side) in steps:
            lo, cut, hi = spans[j, 0][:, None], spans[j, 1], spans[right, 1][:, None]
            # (np.clip's wrapper costs more than the two ufuncs on these small arrays)
            q = np.minimum(np.maximum(cut[:, None] + shifts, lo + 1), hi - 1)  # [cuts, shifts]
            total = cost(lo, q, left_side) + cost(q, hi, right_side)
            best = q[rows, total.argmin(axis=1)]
            moved |= bool((best != cut).any())
            spans[j, 1] = best
            spans[right, 0] = best
        if not moved:
            return
