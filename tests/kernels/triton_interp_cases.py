"""Triton kernels under the interpreter, against the naive ground truth.

Not collected by the normal run (the file name does not match test_*.py): run by
tests/kernels/test_triton_interpreter.py in a subprocess with TRITON_INTERPRET=1, which
must be set before any @triton.jit decorator runs. fp32 only (the interpreter
mis-computes bf16 tl.dot) and <= 256 tokens (it is ~700x slower than a GPU); the
kernels take the 'ieee' dot path for fp32, so tolerances are the tight fp32 ones.
Also drives the public API with set_backend("triton") (CPU tensors are accepted only
under the interpreter).
"""

from __future__ import annotations

import os

import pytest
import torch

from esp_serve.kernels import api as kernels
from esp_serve.kernels import naive, triton_decode, triton_merge, triton_prefill
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close

assert os.environ.get("TRITON_INTERPRET") == "1", "run me through test_triton_interpreter.py"
F32 = torch.float32


@pytest.fixture(autouse=True)
def triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


@pytest.mark.parametrize(
    "P,pairs,hq,hkv",
    [  # GQA ratios 1, 2, 4 (MQA), 8 (MQA)
        (1, [(0, 0)], 2, 2),
        (2, [(0, 1), (1, 0)], 4, 2),
        (3, [(2, 0), (0, 2), (1, 1)], 4, 1),
        (4, [(1, 3), (3, 1), (2, 2)], 8, 1),
        (4, [(0, 3), (3, 0)], 2, 2),
    ],
)
def test_prefill_striped_steps(P, pairs, hq, hkv):
    lengths, bases = [1, 40, 3, 70], [0, 2, 0, 9]
    for rq, rk in pairs:
        q, k, v, qp, kp, cq, ck = cases.striped_step(
            lengths, P, rq, rk, hq, hkv, 32, F32, seed=P * 10 + rq, bases=bases
        )
        o, lse = kernels.varlen_attention(q, k, v, qp, kp, cq, ck)
        assert_attention_close(o, lse, *naive.varlen_attention(q, k, v, qp, kp, cq, ck), F32)


@pytest.mark.parametrize("d", [16, 64])
def test_prefill_head_dims_non_causal_and_empty_requests(d):
    gen = torch.Generator().manual_seed(d)
    lq, lk = [0, 17, 5, 33], [4, 0, 21, 33]
    q, k, v = cases.qkv(sum(lq), sum(lk), 2, 1, d, F32, gen)
    qp = torch.cat([torch.arange(n) + 3 for n in lq]).int()  # int32 positions
    kp = torch.cat([torch.arange(n) for n in lk]).int()
    for causal in (True, False):
        args = (q, k, v, qp, kp, cases.cu(lq), cases.cu(lk))
        o, lse = triton_prefill.varlen_attention(*args, causal=causal)
        assert_attention_close(o, lse, *naive.varlen_attention(*args, causal=causal), F32)
    assert torch.isneginf(lse[:17]).all() and (o[:17] == 0).all()  # request 1 has no keys


def test_prefill_unsorted_positions_and_fully_masked_rows():
    gen = torch.Generator().manual_seed(5)
    q, k, v = cases.qkv(48, 40, 2, 2, 32, F32, gen)
    qp = torch.randperm(60, generator=gen)[:48]
    kp = torch.randperm(60, generator=gen)[:40] + 5  # keys 5..64: queries below 5 see nothing
    args = (q, k, v, qp, kp, cases.cu([48]), cases.cu([40]))
    o, lse = triton_prefill.varlen_attention(*args)
    o_ref, lse_ref = naive.varlen_attention(*args)
    assert torch.isneginf(lse_ref).any()
    assert_attention_close(o, lse, o_ref, lse_ref, F32)


@pytest.mark.parametrize("P", [2, 3])
def test_ring_attention_by_fused_accumulation(P):
    """attention_accumulate on the Triton backend merges in the kernel epilogue."""
    lengths, hq, hkv, d = [30, 7], 4, 2, 32
    gen = torch.Generator().manual_seed(P)
    total = sum(lengths)
    q_all, k_all, v_all = cases.qkv(total, total, hq, hkv, d, F32, gen)
    starts = [0, lengths[0], total]
    pos = torch.cat([torch.arange(n) for n in lengths])
    req = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
    rank = (pos + req) % P
    full = naive.varlen_attention(q_all, k_all, v_all, pos, pos, cases.cu(lengths), cases.cu(lengths))
    for r in range(P):
        sel_q = rank == r
        cu_q = cases.cu([int(sel_q[starts[b] : starts[b + 1]].sum()) for b in range(2)])
        o_acc = torch.zeros((int(sel_q.sum()), hq, d))
        lse_acc = torch.full((int(sel_q.sum()), hq), float("-inf"))
        for step in range(P):
            sel_k = rank == (r - step) % P
            cu_k = cases.cu([int(sel_k[starts[b] : starts[b + 1]].sum()) for b in range(2)])
            kernels.attention_accumulate(
                o_acc, lse_acc, q_all[sel_q], k_all[sel_k], v_all[sel_k], pos[sel_q], pos[sel_k], cu_q, cu_k
            )
        assert_attention_close(o_acc, lse_acc, full[0][sel_q], full[1][sel_q], F32)


@pytest.mark.parametrize("splits", [None, 1, 2, 3])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_slot_attention_decode_split_kv(splits, hq, hkv):
    q, cq, kv, ids, cs = cases.slot_case(
        [1, 1, 0, 1, 1], [3, 0, 6, 300, 129], hq, hkv, 32, F32, seed=hq + hkv
    )
    o, lse = triton_decode.slot_attention(q, cq, kv, ids, cs, num_splits=splits)
    assert_attention_close(o, lse, *naive.slot_attention(q, cq, kv, ids, cs), F32)
    assert torch.isneginf(lse[1]).all() and (o[1] == 0).all()  # request 1 has no slots


def test_slot_attention_many_query_rows_and_int32_ids():
    """Chunked-prefill rows (queries x GQA group > 16) take the 64-row block path."""
    q, cq, kv, ids, cs = cases.slot_case([9, 1, 3], [40, 17, 0], 8, 2, 16, F32, seed=3)
    o, lse = kernels.slot_attention(q, cq, kv, ids.int(), cs)
    assert_attention_close(o, lse, *naive.slot_attention(q, cq, kv, ids, cs), F32)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_merge_kernel(k):
    gen = torch.Generator().manual_seed(k)
    outs = [torch.randn(9, 3, 64, generator=gen) for _ in range(k)]
    lses = [torch.randn(9, 3, generator=gen) * 20 for _ in range(k)]
    lses[0][2] = float("-inf")
    outs[0][2] = float("nan")  # garbage in an empty partial must not leak
    for x in lses:
        x[4] = float("-inf")  # a row with no keys anywhere
    o, lse = kernels.merge_partials(outs, lses)
    o_ref, lse_ref = naive.merge_partials(outs, lses)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=2e-5)
    o_d, lse_d = triton_merge.merge_partials([x.double().float() for x in outs], lses)
    torch.testing.assert_close(o_d, o, atol=0, rtol=0)


def test_wrappers_reject_bad_inputs():
    q, k, v, qp, kp, cq, ck = cases.striped_step([8], 1, 0, 0, 2, 2, 24, F32, seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        triton_prefill.varlen_attention(q, k, v, qp, kp, cq, ck)
    q, k, v, qp, kp, cq, ck = cases.striped_step([8], 1, 0, 0, 2, 2, 32, F32, seed=0)
    with pytest.raises(ValueError, match="contiguous"):
        triton_prefill.varlen_attention(q, k, v.transpose(1, 2).contiguous().transpose(1, 2), qp, kp, cq, ck)


def test_entry_points_with_host_layouts_read_nothing_back():
    """With the caller's host layouts the Triton wrappers (prefill, fused accumulate,
    split-KV decode) size their grids without reading a tensor back."""
    from tests.support.host_reads import describe, host_reads

    args = cases.striped_step([1, 40, 3, 70], 2, 1, 0, 4, 2, 32, F32, seed=3, bases=[0, 2, 0, 9])
    q, _, _, qp, kp, cq, ck = args
    host_q, host_k = cases.host_layout(cq, qp, 2), cases.host_layout(ck, kp, 2)
    sq, scq, kv, ids, scs = cases.slot_case([1, 1, 0, 1], [3, 0, 6, 300], 8, 2, 32, F32, seed=5)
    host_sq, host_ss = cases.host_layout(scq), cases.host_layout(scs)
    o_acc = torch.zeros(q.shape, dtype=F32)
    lse_acc = torch.full(q.shape[:2], float("-inf"))
    with host_reads() as reads:
        o, lse = kernels.varlen_attention(*args, host_q=host_q, host_k=host_k)
        kernels.attention_accumulate(o_acc, lse_acc, *args, host_q=host_q, host_k=host_k)
        so, slse = triton_decode.slot_attention(
            sq, scq, kv, ids, scs, num_splits=3, host_q=host_sq, host_slots=host_ss
        )
    assert not reads, describe(reads)
    expect = naive.varlen_attention(*args)
    assert_attention_close(o, lse, *expect, F32)
    assert_attention_close(o_acc, lse_acc, *expect, F32)
    assert_attention_close(so, slse, *naive.slot_attention(sq, scq, kv, ids, scs), F32)


@pytest.mark.parametrize("bound", [300, 512, 1024])
def test_slot_attention_with_a_bound_instead_of_host_offsets(bound):
    """The launch a CUDA graph records: the KV split comes from a bound on every slot list,
    the lists sit at the front of a larger buffer and the kernel reads the real offsets on
    the device (padding rows have none)."""
    q, cq, kv, ids, cs = cases.slot_case([1, 1, 1, 1, 1], [3, 0, 6, 300, 129], 8, 2, 32, F32, seed=bound)
    buffer = torch.cat([ids, torch.zeros(5 * bound - ids.numel(), dtype=ids.dtype)])
    o, lse = kernels.slot_attention(q, cq, kv, buffer, cs, host_q=cases.host_layout(cq), max_slots=bound)
    assert_attention_close(o, lse, *naive.slot_attention(q, cq, kv, ids, cs), F32)
    assert torch.isneginf(lse[1]).all() and (o[1] == 0).all()


def test_cascade_slot_attention_through_the_triton_kernels():
    """Shared-prefix decode attention on the Triton backend: the group's stacked queries
    run as one multi-query request of the slot kernel, the merge as the Triton merge."""
    from esp_serve.kernels.cascade import CascadeLayout, cascade_slot_attention

    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(300, 2, 2, 32, generator=gen)
    doc = torch.randperm(300, generator=gen).tolist()
    lists = [doc[:150] + doc[200:210], doc[:150] + doc[210:213], doc[250:270], doc[:150]]
    q = torch.randn(4, 8, 32, generator=gen)
    cq = cases.cu([1] * 4)
    layout = CascadeLayout.build(lists, [1] * 4, torch.device("cpu"))
    assert layout is not None and layout.shared_slots == 2 * 150
    o, lse = cascade_slot_attention(q, cq, kv, layout)
    ids = torch.tensor([s for x in lists for s in x])
    cs = cases.cu([len(x) for x in lists])
    assert_attention_close(o, lse, *naive.slot_attention(q, cq, kv, ids, cs), F32)
