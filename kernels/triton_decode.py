"""Triton partial attention over the token-slot KV pool (decode, multi-master partials),
split over KV for long contexts, returning LSE.

Layout: kv_layer [slots, 2, Hkv, D]; request b's keys are the slots
slot_ids[cu_slots[b]:cu_slots[b+1]] in any order. One program per (request, kv head,
row block, split):

* Rows are (query token, head of the GQA group) pairs: all GROUP query heads sharing a
  kv head are computed from one load of that head's K/V, so each K/V byte is read once
  per query token (decode is bandwidth-bound; this is what makes GQA cheap). Decode has
  GROUP rows per request, padded to a 16-row block for tl.dot.
* Split-KV: with few requests the (request, kv head) programs cannot fill the GPU, so
  each request's slot list is cut into `num_splits` ranges computed by separate
  programs; their (o, lse) partials are merged by the merge kernel (second pass). A
  split past the end of a request's list writes o = 0, lse = -inf, so every partial is
  defined; merges weigh it 0.
* K/V rows are gathered through the slot ids (int64 offsets, the pool can exceed 2^31
  elements). exp2 inside, LSE leaves in natural log.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from esp_serve.kernels import checks
from esp_serve.kernels.triton_common import (
    HEAD_DIMS,
    LOG2E,
    autotuned,
    device_ok,
    dot_precision,
    interpreting,
    sm_count,
)
from esp_serve.kernels.triton_merge import merge_stacked

LN2_C = tl.constexpr(0.6931471805599453)
MAX_SPLITS = 64  # bounds the partial buffers: [splits, T, Hq, D] fp32
MIN_SPLIT = 512  # keys per split below which splitting costs more than it gains


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    shapes = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 4)]
    return autotuned([triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes])


def _prune(configs, named_args, **kwargs):
    """64-row blocks with 128-key tiles spill registers on 4 warps (compile_check)."""
    big_rows = kwargs.get("BLOCK_M", 16) > 16
    kept = [c for c in configs if not (big_rows and c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4)]
    return kept or configs[:1]


@triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM", "GROUP", "BLOCK_M", "split_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _slot_kernel(
    Q,
    KV,
    SLOTS,
    CU_Q,
    CU_S,
    O,
    LSE,
    qk_scale,
    n_kv_heads,
    split_size,
    split_bucket,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kk,
    stride_kh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lt,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    rb = tl.program_id(1)
    sp = tl.program_id(2)
    q0 = tl.load(CU_Q + b)
    n_q = tl.load(CU_Q + b + 1) - q0
    s0 = tl.load(CU_S + b)
    n_s = tl.load(CU_S + b + 1) - s0
    if rb * BLOCK_M < n_q * GROUP:
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < n_q * GROUP
        tok = (q0 + r // GROUP).to(tl.int64)  # query token of each row
        h = hk * GROUP + r % GROUP  # its query head
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + tok[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
            mask=r_ok[:, None],
            other=0.0,
        )
        if DOT_PREC == "ieee":
            q = q.to(tl.float32)

        lo = sp * split_size
        hi = tl.minimum(lo + split_size, n_s)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        k_head = KV + hk * stride_kh
        v_head = KV + stride_kk + hk * stride_kh
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            ok = j < hi
            slot = tl.load(SLOTS + s0 + j, mask=ok, other=0).to(tl.int64)
            kt = tl.load(k_head + slot[None, :] * stride_ks + offs_d[:, None], mask=ok[None, :], other=0.0)
            v = tl.load(v_head + slot[:, None] * stride_ks + offs_d[None, :], mask=ok[:, None], other=0.0)
            if DOT_PREC == "ieee":
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [M, N], log2 units
            qk = tl.where(ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new

        has = l_i > 0.0
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * LN2_C, float("-inf"))
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        split_o = O + sp.to(tl.int64) * stride_os
        split_l = LSE + sp.to(tl.int64) * stride_ls
        tl.store(
            split_o + tok[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
            o.to(O.dtype.element_ty),
            mask=r_ok[:, None],
        )
        tl.store(split_l + tok * stride_lt + h * stride_lh, lse, mask=r_ok)


def supports(q: torch.Tensor) -> bool:
    return q.shape[-1] in HEAD_DIMS


def choose_splits(n_programs: int, total_keys_per_head: int, max_keys: int, device_index: int) -> int:
    """Enough programs to fill the GPU (~4 per SM), at most MAX_SPLITS, at least MIN_SPLIT
    keys per split; 1 when the (request, kv head, row block) programs already fill it."""
    target = 4 * sm_count(device_index)
    if n_programs >= target or max_keys <= MIN_SPLIT:
        return 1
    per_split = max(MIN_SPLIT, -(-total_keys_per_head * n_programs // max(1, target)))
    per_split = max(per_split, -(-max_keys // MAX_SPLITS))
    return max(1, min(MAX_SPLITS, -(-max_keys // per_split)))


def slot_attention(
    q,
    cu_seqlens_q,
    kv_layer,
    slot_ids,
    cu_slots,
    scale=None,
    *,
    num_splits=None,
    host_q=None,
    host_slots=None,
    max_slots=None,
):
    """Triton version of `kernels.slot_attention` (same contract and shapes).

    num_splits: force the KV split count (tests); default picks it from the batch shape.
    host_q/host_slots: host copies of the offsets; the grid and the splits come from them.
    max_slots: a bound on every request's slot count used instead of host_slots (a launch
    captured in a CUDA graph and replayed with other offsets: the split is fixed by the
    bound, the kernel reads the actual offsets on the device).
    """
    if max_slots is None:
        cq, cs = checks.slots(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, host_q, host_slots)
    else:
        checks.heads(q, kv_layer[:, 0], kv_layer[:, 1])
        cq = checks.host_offsets(cu_seqlens_q, host_q, q.shape[0], "cu_seqlens_q")
        checks.require(cu_slots.shape == (len(cq),), "cu_slots must be [B+1] like cu_seqlens_q")
        cs = [b * max_slots for b in range(len(cq))]  # the bound, as if every list were full
    for t in (q, kv_layer, slot_ids, cu_seqlens_q, cu_slots):
        checks.require(device_ok(t), f"triton kernels need CUDA tensors (got {t.device})")
    tq, hq, d = q.shape
    hkv = kv_layer.shape[2]
    checks.require(supports(q), f"triton kernels take head_dim in {HEAD_DIMS}, got {d}")
    checks.require(q.stride(2) == 1 and kv_layer.stride(3) == 1, "q/kv_layer need a contiguous head_dim")
    group = hq // hkv
    n_req = len(cq) - 1
    o = torch.empty((tq, hq, d), dtype=q.dtype, device=q.device)  # contiguous: merged into
    lse = torch.empty((tq, hq), dtype=torch.float32, device=q.device)
    if tq == 0 or n_req == 0:
        return o, lse
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    max_q = max(b - a for a, b in zip(cq, cq[1:]))
    n_slots = [b - a for a, b in zip(cs, cs[1:])]
    block_m = 16 if max_q * group <= 16 else 64
    row_blocks = triton.cdiv(max_q * group, block_m)
    checks.require(row_blocks <= 65535, "too many query rows per request for the slot kernel")
    if num_splits is None:
        num_splits = choose_splits(n_req * hkv * row_blocks, sum(n_slots), max(n_slots), q.device.index or 0)
    num_splits = max(1, min(int(num_splits), 65535))
    split_size = max(1, -(-max(n_slots) // num_splits))
    split_size = -(-split_size // 128) * 128  # whole tiles for every BLOCK_N config
    num_splits = max(1, -(-max(n_slots) // split_size))
    if num_splits == 1:  # write the final result directly
        o_part, lse_part = o.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_part = torch.empty((num_splits, tq, hq, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, tq, hq), dtype=torch.float32, device=q.device)
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_s = cu_slots.to(device=q.device, dtype=torch.int32)
    _slot_kernel[(n_req * hkv, row_blocks, num_splits)](
        q,
        kv_layer,
        slot_ids,
        cu_q,
        cu_s,
        o_part,
        lse_part,
        scale * LOG2E,
        hkv,
        split_size,
        1 << max(0, (split_size - 1).bit_length()),
        q.stride(0),
        q.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        lse_part.stride(2),
        GROUP=group,
        HEAD_DIM=d,
        DOT_PREC=dot_precision(q.dtype),
        BLOCK_M=block_m,
    )
    if num_splits > 1:
        merge_stacked(o_part, lse_part, q.dtype, out=o, lse_out=lse)
    return o, lse
