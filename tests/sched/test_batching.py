"""The batching DP: exact against the plain-loop reference (tests/support), bounded version measured
against the exhaustive one on random cases, KV constraint respected."""

import math

import numpy as np
import pytest

from esp_core.sched.batching import plan_batches
from esp_core.sched.cost_model import CostModel
from tests.support.sched_reference import interval_dp_reference

COST = CostModel.default_a800()


def _cost_of(result, lengths, coeffs):
    a, b, c = coeffs
    total = 0.0
    for ba in result.batches:
        L = np.array([lengths[i] for i in ba.requests], dtype=float)
        t = a[ba.dop] + b[ba.dop] * L.sum() + c[ba.dop] * (L * L).sum()
        total += t * (1.0 / L).sum()
    return total


@pytest.mark.parametrize("seed", range(12))
def test_unbounded_dp_equals_plain_reference(seed):
    rng = np.random.default_rng(seed)
    n, K = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    lengths = rng.integers(50, 60_000, n)
    free = rng.integers(1000, 120_000, K)
    coeffs = COST.prefill_coeff_arrays(K)
    got = plan_batches(lengths, free, coeffs, headroom=16)
    ref = interval_dp_reference(lengths, free, coeffs, headroom=16)
    if math.isinf(ref):
        assert got is None
    else:
        assert got.cost == pytest.approx(ref, rel=1e-9)
        assert _cost_of(got, lengths, coeffs) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize(
    "n,K,max_len",
    [(30, 16, 100_000), (300, 24, 20_000)],  # the second: bundled, ΣL at 99.7% of the slots
)
def test_every_request_in_exactly_one_batch_and_kv_fits(n, K, max_len):
    rng = np.random.default_rng(7)
    lengths = rng.integers(100, max_len, n)
    free = rng.integers(50_000, 210_000, K)
    res = plan_batches(lengths, free, COST.prefill_coeff_arrays(K), headroom=16)
    assert res is not None
    reqs = sorted(i for b in res.batches for i in b.requests)
    assert reqs == list(range(n))
    insts = [i for b in res.batches for i in b.instances]
    assert len(insts) == len(set(insts))
    for b in res.batches:
        assert sum(lengths[i] for i in b.requests) <= sum(free[j] - 16 for j in b.instances)


def test_long_request_gets_more_instances_than_short_ones():
    lengths = [400_000, 2000, 1500, 1000]
    res = plan_batches(lengths, [210_000] * 8, COST.prefill_coeff_arrays(8))
    by_req = {i: b for b in res.batches for i in b.requests}
    long = by_req[0]
    # batched alone: a short request sharing its batch would wait the long prefill out
    assert long.requests == (0,)
    assert long.dop >= 2  # 400K does not fit one instance anyway
    # it runs on more instances than any short one, and uses most of the group
    assert all(long.dop > by_req[i].dop for i in (1, 2, 3))
    assert long.dop >= 8 - 3 and sum(b.dop for b in res.batches) == 8


def test_infeasible_returns_none():
    assert plan_batches([500], [100, 100], COST.prefill_coeff_arrays(2)) is None
    assert plan_batches([], [100], COST.prefill_coeff_arrays(1)).batches == ()


def _exact(lengths, free, coeffs):
    # every request its own group, a batch spanning any number of them: the exhaustive
    # DP (test_unbounded_dp_equals_plain_reference checks it against the plain loops)
    n = len(lengths)
    return plan_batches(lengths, free, coeffs, max_request_groups=n, max_batch_groups=n)


def _loss(lengths, free, coeffs, exact):
    bounded = plan_batches(lengths, free, coeffs)  # the scheduler's defaults
    assert bounded is not None
    cost = _cost_of(bounded, lengths, coeffs)
    assert cost == pytest.approx(bounded.cost, rel=1e-9)
    assert cost >= exact.cost * (1 - 1e-9)
    return cost / exact.cost - 1


def test_bounded_dp_loses_little_on_random_cases():
    """Default-bounded DP against the exhaustive one on the same random inputs (10-60
    requests log-uniform in 100-100K tokens, 10-64 instances): relative loss in the
    objective. Measured (docs/bench-scheduler.md): 0% here (these rounds have at most
    4 groups per instance, so the defaults keep every request its own group)."""
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(25):
        n, K = int(rng.integers(10, 60)), int(rng.integers(10, 64))
        lengths = np.exp(rng.uniform(np.log(100), np.log(100_000), n)).astype(int)
        free = rng.integers(100_000, 210_000, K)
        coeffs = COST.prefill_coeff_arrays(K)
        exact = _exact(lengths, free, coeffs)
        if exact is None:
            continue
        losses.append(_loss(lengths, free, coeffs, exact))
    assert len(losses) >= 20
    assert np.mean(losses) < 0.01 and max(losses) < 0.05


@pytest.mark.parametrize(
    "n,K,max_loss",
    [(64, 8, 0.01), (128, 32, 0.01), (200, 16, 0.01), (300, 48, 0.01), (200, 96, 0.06)],
)
def test_bounded_dp_loses_little_on_benchmark_shaped_cases(n, K, max_loss):
    """Like `python -m esp_core.sched.bench`'s DP cases (uniform 100-20K tokens, 210K
    slots per instance), with more requests than the default groups; 300 x 48 is a
    round where 64 groups are not a multiple of the instances; 200 x 96 the known weak
    spot, more instances than groups with ~2 requests per instance. Measured: 64x8 0%,
    128x32 0%, 200x16 0.3%, 300x48 0.4%, 200x96 4.9%."""
    rng = np.random.default_rng(n * K)
    lengths = rng.integers(100, 20_001, n)
    free = np.full(K, 210_000)
    coeffs = COST.prefill_coeff_arrays(K)
    exact = _exact(lengths, free, coeffs)
    assert exact is not None
    assert _loss(lengths, free, coeffs, exact) < max_loss


def test_bounded_dp_loses_little_with_wide_lengths_and_many_requests():
    """200 requests log-uniform in 100-100K tokens on 40 instances of 100K-210K slots:
    long requests want batches of their own, short ones share. Measured: 1.0-1.3% over
    seeds 0-3."""
    rng = np.random.default_rng(0)
    lengths = np.exp(rng.uniform(np.log(100), np.log(100_000), 200)).astype(int)
    free = rng.integers(100_000, 210_000, 40)
    coeffs = COST.prefill_coeff_arrays(40)
    exact = _exact(lengths, free, coeffs)
    assert exact is not None
    assert _loss(lengths, free, coeffs, exact) < 0.05
