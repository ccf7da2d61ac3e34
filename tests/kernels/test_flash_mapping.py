"""The flash-attn adapter's mapping of global-position masks onto bottom-right causal
blocks (kernels/flash_adapter.py), checked on CPU against the ground truth.

flash-attn itself cannot be installed without CUDA, so `emulated_flash` below plays
its documented contract (varlen packing, bottom-right causal mask, softmax_lse [Hq, Tq]
in natural log with +inf on rows without keys). What is under test is the adapter's
plan: which queries it drops, which keys it keeps, and how it scatters results back.
The real kernel is compared in tests/kernels/test_gpu.py when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from esp_serve.kernels import flash_adapter, naive
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close


def emulated_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, return_attn_probs):
    assert dropout_p == 0.0 and return_attn_probs and q.is_contiguous()
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"))  # flash marks empty rows +inf
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert lq <= max_q and lk <= max_k
        if lq == 0 or lk == 0:
            continue
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        mask = (j <= i + lk - lq) if causal else None  # bottom-right aligned
        o_b, lse_b = naive.attend(
            q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]], mask, softmax_scale
        )
        out[cq[b] : cq[b + 1]] = o_b.to(q.dtype)
        lse[:, cq[b] : cq[b + 1]] = torch.where(torch.isneginf(lse_b), float("inf"), lse_b).T
    return out, lse, None


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_striped_ring_steps_map_exactly(P):
    lengths, bases = [1, 2, 9, 31, 4, 17], [0, 3, 0, 5, 1, 0]
    for rq in range(P):
        for rk in range(P):
            q, k, v, qp, kp, cq, ck = cases.striped_step(
                lengths, P, rq, rk, 4, 2, 16, torch.float32, seed=10 * rq + rk, bases=bases
            )
            res = flash_adapter.varlen_attention(q, k, v, qp, kp, cq, ck, fn=emulated_flash)
            assert res is not None, f"striped step {rq}<-{rk} of P={P} must be expressible"
            assert_attention_close(*res, *naive.varlen_attention(q, k, v, qp, kp, cq, ck), torch.float32)


def test_plan_of_a_strictly_causal_step():
    """Queries at 1, 5, 9 (rank 1 of P=4) vs keys at 2, 6, 10 (rank 2): strictly causal,
    query 0 dropped, keys truncated to the two that a kept query can see."""
    qp, kp = torch.tensor([1, 5, 9]), torch.tensor([2, 6, 10])
    plan = flash_adapter.plan_causal(qp, kp, [0, 3], [0, 3])
    assert plan.drop == [1] and plan.keep_k == [2] and not plan.identity
    plan = flash_adapter.plan_causal(kp, qp, [0, 3], [0, 3])  # the other way: causal
    assert plan.drop == [0] and plan.keep_k == [3] and plan.identity


def test_chunk_after_cached_prefix_and_non_causal():
    gen = torch.Generator().manual_seed(2)
    q, k, v = cases.qkv(12, 45, 4, 4, 16, torch.float32, gen)
    qp = torch.cat([torch.arange(20, 25), torch.arange(13, 20)])  # chunks ending at 24 and 19
    kp = torch.cat([torch.arange(25), torch.arange(20)])  # keys: cached prefix + the chunk
    cq, ck = cases.cu([5, 7]), cases.cu([25, 20])
    for causal in (True, False):
        res = flash_adapter.varlen_attention(q, k, v, qp, kp, cq, ck, causal=causal, fn=emulated_flash)
        assert res is not None
        assert_attention_close(
            *res, *naive.varlen_attention(q, k, v, qp, kp, cq, ck, causal=causal), torch.float32
        )


@pytest.mark.parametrize(
    "qp,kp",
    [
        ([0, 2, 4], [0, 1, 2]),  # two strides in one request
        ([0, 1, 3], [0, 1, 2]),  # not a progression
        ([10, 11, 12], [0, 1]),  # all keys before all queries: top-left, not bottom-right
    ],
)
def test_inexpressible_calls_fall_back(qp, kp):
    q, k, v = cases.qkv(len(qp), len(kp), 2, 2, 8, torch.float32, torch.Generator().manual_seed(0))
    res = flash_adapter.varlen_attention(
        q,
        k,
        v,
        torch.tensor(qp),
        torch.tensor(kp),
        cases.cu([len(qp)]),
        cases.cu([len(kp)]),
        fn=emulated_flash,
    )
    assert res is None
