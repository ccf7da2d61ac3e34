"""The scheduler's fast paths change no decision.

1. Scenario equivalence: seeded random workloads (mixed prompt lengths, tight and
   roomy KV, aborts) through the scheduler under several policies, once built with the
   reference implementations (tests/support/sched_reference.py) and once with the
   shipped code: every emitted plan, token and finish must be identical.
2. Unit equivalence of each fast path against its reference on random inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esp_core.sched.admission import PeakMemoryCheck
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.kv_accounting import KVAccounting
from esp_core.sched.plan import NewRequest, PrefillBatch, SamplingParams, TokenRange
from esp_core.sched.scheduler import ESPScheduler
from esp_core.sched.scheduler_state import Algorithms
from tests.support.sched_reference import (
    ReferenceKVAccounting,
    ReferencePeakMemoryCheck,
    reference_algorithms,
)

from .fake_clock import run

COST = CostModel.default_a800()
EOS = 2

CONFIGS = {
    "esp": ESPSchedulerConfig(eos_token_ids=(EOS,)),
    "esp-chunked": ESPSchedulerConfig(
        eos_token_ids=(EOS,), chunked_prefill=True, chunk_tokens=700, long_request_max_wait_s=0.05
    ),
    "esp-nogain-tinydp": ESPSchedulerConfig(
        eos_token_ids=(EOS,),
        gain_vs_delay=False,
        dp_max_request_groups=3,
        dp_max_batch_groups=2,
        min_decode_steps_between_borrows=2,
    ),
    "loongserve": ESPSchedulerConfig.loongserve("mixed", eos_token_ids=(EOS,)),
}


def _workload(seed: int):
    rng = np.random.default_rng(seed)
    n_inst = int(rng.choice([2, 5, 8, 16]))
    slots = int(rng.choice([700, 2500, 20_000]))
    reqs = []
    for i in range(int(rng.integers(20, 60))):
        t = float(rng.uniform(0, 0.3))
        prompt = int(np.exp(rng.uniform(np.log(4), np.log(min(2 * slots, 8000)))))
        # long outputs grow decode groups past their instances: scale-up and preemption
        out = int(rng.integers(1, 40)) if rng.random() < 0.6 else int(rng.integers(100, 400))
        sp = SamplingParams(max_tokens=out, ignore_eos=bool(rng.random() < 0.7))
        reqs.append((t, NewRequest(f"r{i}", (5,) * prompt, sp, t)))
    aborts = [(float(rng.uniform(0, 0.6)), f"r{int(rng.integers(len(reqs)))}") for _ in range(2)]
    tokens = [int(x) for x in rng.choice([EOS, 7, 11, 13, 17], size=9)]
    return n_inst, slots, reqs, aborts, tokens


def _step_time(b):
    if isinstance(b, PrefillBatch):
        return 0.004 + 2e-6 * b.num_tokens / b.dop
    return 0.002 + 1e-4 * len(b.items)


def _run(policy: str, seed: int, algorithms: Algorithms):
    n_inst, slots, reqs, aborts, tokens = _workload(seed)
    s = ESPScheduler(ClusterSpec(n_inst, slots), COST, CONFIGS[policy], algorithms)
    res = run(
        s,
        reqs,
        aborts=aborts,
        step_time=_step_time,
        keep_plans=True,
        token_fn=lambda rid, k: tokens[(k + int(rid[1:])) % len(tokens)],
    )
    return res, dict(s.stats)


@pytest.mark.parametrize("policy", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
def test_same_plans_as_the_reference_code(policy, seed):
    ref, ref_stats = _run(policy, seed, reference_algorithms())
    new, new_stats = _run(policy, seed, Algorithms())
    assert len(new.plans) == len(ref.plans)
    for k, (a, b) in enumerate(zip(ref.plans, new.plans)):
        assert a == b, f"plan {k} differs"
    assert new.tokens == ref.tokens and new.finishes == ref.finishes
    assert new_stats == ref_stats


# ---------------------------------------------------------------- KV accounting

_ops = st.lists(
    st.tuples(
        st.sampled_from(["place", "place", "place", "release"]),
        st.integers(0, 3),  # request
        st.integers(0, 2),  # instance
        st.integers(0, 40),  # start
        st.integers(0, 12),  # length
        st.integers(1, 2),
    ),  # ranges in one call
    max_size=40,
)


def _apply(kv: KVAccounting, ops) -> list:
    log = []
    for op, r, inst, start, length, parts in ops:
        rid = f"q{r}"
        try:
            if op == "release":
                log.append(("release", kv.release(rid)))
            else:
                ranges = [
                    TokenRange(start + p * (length + 1), start + p * (length + 1) + length)
                    for p in range(parts)
                ]
                kv.place(rid, inst, ranges)
                log.append(("placed",))
        except Exception as e:  # noqa: BLE001 -- the same error must be raised
            log.append((type(e).__name__, str(e)))
        log.append(
            (
                kv.total_free,
                kv.used.tolist(),
                {q: {i: list(rs) for i, rs in per.items()} for q, per in kv._ranges.items()},
            )
        )
    return log


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_ops)
def test_kv_place_and_release_match_the_reference(ops):
    fast, ref = KVAccounting(3, 60), ReferenceKVAccounting(3, 60)
    assert _apply(fast, ops) == _apply(ref, ops)
    assert fast._used_total == int(fast.used.sum())
    for rid, per in fast._ranges.items():  # placement as first written
        assert fast.placement(rid) == {i: sum(len(r) for r in rs) for i, rs in per.items()}
        assert list(fast.placement(rid)) == list(per)


# ---------------------------------------------------------------- peak memory check

_entries = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5000)), max_size=30)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    _entries,
    st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 5000)), max_size=30),
    st.integers(0, 200_000),
)
def test_peak_check_matches_the_reference(resident, ops, capacity):
    _check_against_reference(resident, ops, capacity, None)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    _entries,
    st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 5000)), max_size=30),
    st.integers(0, 200_000),
    st.integers(0, 300),
    st.integers(0, 50_000),
)
def test_deferred_peak_check_matches_the_reference(resident, ops, capacity, rem_slack, slack):
    """The scheduler's check: arrays loaded only when needed, any upper bound given."""
    rem = [r for r, _ in resident]
    bound = (max(rem, default=0) + rem_slack) * len(rem) + sum(c for _, c in resident) + slack
    _check_against_reference(resident, ops, capacity, bound if resident else 0)


def _check_against_reference(resident, ops, capacity, bound):
    rem = [r for r, _ in resident]
    cur = [c for _, c in resident]
    if bound is None:
        fast = PeakMemoryCheck(rem, cur, capacity)
    else:
        fast = PeakMemoryCheck.deferred(lambda: (rem, cur), bound, capacity)
    ref = ReferencePeakMemoryCheck(rem, cur, capacity)
    for admit, r, c in ops:
        assert fast.fits(r, c) == ref.fits(r, c)
        if admit:
            fast.add(r, c)
            ref.add(r, c)
        else:
            assert fast.peak_with(r, c) == ref.peak_with(r, c)
    assert fast.peak == ref.peak
