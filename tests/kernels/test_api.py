"""Public API: backend selection, ring attention by accumulation, write_kv round trip."""

from __future__ import annotations

import os

import pytest
import torch

from esp_serve.kernels import api as kernels
from esp_serve.kernels import naive
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close


def test_available_backends_are_truthful():
    names = kernels.available_backends()
    assert names[0] == "torch"
    gpu_or_interp = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert ("triton" in names) == gpu_or_interp
    if not torch.cuda.is_available():
        assert "flash" not in names


def test_set_backend_validates():
    with pytest.raises(ValueError, match="unknown"):
        kernels.set_backend("cudnn")
    if "triton" not in kernels.available_backends():
        with pytest.raises(ValueError, match="not available"):
            kernels.set_backend("triton")
    kernels.set_backend("torch")
    assert kernels.get_backend() == "torch"
    kernels.set_backend("auto")
    assert kernels.get_backend() == "auto"


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_striped_ring_attention_by_accumulation_equals_full_causal(P, dtype):
    """architecture.md §3.1 end to end: every rank accumulates its queries against each rank's K/V
    block in ring order; the result equals causal attention over the whole sequence."""
    lengths, hq, hkv, d = [23, 5, 64, 1], 8, 2, 16
    gen = torch.Generator().manual_seed(P)
    total = sum(lengths)
    q_all, k_all, v_all = cases.qkv(total, total, hq, hkv, d, dtype, gen)
    starts = torch.tensor([0] + lengths).cumsum(0).tolist()
    pos = torch.cat([torch.arange(n) for n in lengths])
    req = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
    rank = (pos + req % P) % P  # rotated start offset s_b = b mod P

    def shard(r):
        sel = rank == r
        return sel, cases.cu([int(sel[starts[b] : starts[b + 1]].sum()) for b in range(len(lengths))])

    o_full, lse_full = naive.varlen_attention(
        q_all, k_all, v_all, pos, pos, cases.cu(lengths), cases.cu(lengths)
    )
    for r in range(P):
        sel_q, cu_q = shard(r)
        o_acc = torch.zeros((int(sel_q.sum()), hq, d))
        lse_acc = torch.full((int(sel_q.sum()), hq), float("-inf"))
        for step in range(P):
            src = (r - step) % P  # the block that arrives at rank r at this step
            sel_k, cu_k = shard(src)
            kernels.attention_accumulate(
                o_acc, lse_acc, q_all[sel_q], k_all[sel_k], v_all[sel_k], pos[sel_q], pos[sel_k], cu_q, cu_k
            )
        assert_attention_close(o_acc.to(dtype), lse_acc, o_full[sel_q], lse_full[sel_q], dtype)


def test_write_kv_then_slot_attention():
    gen = torch.Generator().manual_seed(7)
    pool = torch.zeros(40, 2, 2, 16)
    q, k, v = cases.qkv(2, 11, 4, 2, 16, torch.float32, gen)
    slots = torch.randperm(40, generator=gen)[:11]
    kernels.write_kv(pool, slots, k, v)
    assert torch.equal(pool[slots, 0], k) and torch.equal(pool[slots, 1], v)
    cu_s = cases.cu([7, 4])
    o, lse = kernels.slot_attention(q, cases.cu([1, 1]), pool, slots, cu_s)
    o_ref, lse_ref = naive.varlen_attention(
        q, k, v, torch.zeros(2).long(), torch.zeros(11).long(), cases.cu([1, 1]), cu_s, causal=False
    )
    assert_attention_close(o, lse, o_ref, lse_ref, torch.float32)
    with pytest.raises(ValueError):
        kernels.write_kv(pool, slots[:3], k, v)
