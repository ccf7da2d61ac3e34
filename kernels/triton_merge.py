"""Triton merge of k partial attention results (o_i, lse_i) of the same queries.

The guarded rule of architecture.md §3.1, one program per block of (token, head) rows:
m = max_i lse_i; w_i = exp(lse_i - m) with w_i = 0 where lse_i = -inf (its o_i is never
even loaded, so garbage or NaN in an empty partial cannot leak); lse = m + log sum w_i;
o = sum w_i o_i / sum w_i; rows with no keys anywhere get (0, -inf). Two passes over the
LSEs (cheap), one over the outputs. Also the second pass of split-KV decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from esp_serve.kernels import checks
from esp_serve.kernels.triton_common import interpreting


@triton.jit
def _merge_kernel(
    O_IN,
    LSE_IN,
    O_OUT,
    LSE_OUT,
    n_rows,
    n_parts,
    stride_op,
    stride_lp,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """O_IN [n_parts, n_rows, HEAD_DIM] and LSE_IN [n_parts, n_rows] (part strides given,
    rows contiguous) -> O_OUT [n_rows, HEAD_DIM], LSE_OUT [n_rows] (contiguous)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    r64 = r.to(tl.int64)
    # running pointers (64-bit) step from part to part: no int32 overflow of i * stride
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lse_ptrs = LSE_IN + r64
    for _ in range(n_parts):
        m = tl.maximum(m, tl.load(lse_ptrs, mask=r_ok, other=float("-inf")))
        lse_ptrs += stride_lp
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    lse_ptrs = LSE_IN + r64
    o_ptrs = O_IN + r64[:, None] * HEAD_DIM + d[None, :]
    for _ in range(n_parts):
        lse_i = tl.load(lse_ptrs, mask=r_ok, other=float("-inf"))
        w = tl.exp(lse_i - m_safe)  # exp(-inf) = 0: empty partials weigh nothing
        keep = r_ok & (lse_i > float("-inf"))
        o_i = tl.load(o_ptrs, mask=keep[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += w[:, None] * o_i
        w_sum += w
        lse_ptrs += stride_lp
        o_ptrs += stride_op
    has = w_sum > 0.0
    denom = tl.where(has, w_sum, 1.0)
    o = acc / denom[:, None]
    lse = tl.where(has, m_safe + tl.log(denom), float("-inf"))
    tl.store(
        O_OUT + r64[:, None] * HEAD_DIM + d[None, :],
        o.to(O_OUT.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE_OUT + r64, lse, mask=r_ok)


def merge_stacked(
    o_parts: torch.Tensor,
    lse_parts: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
):
    """o_parts [k, T, H, D] and lse_parts [k, T, H] (each part contiguous) -> (o, lse)."""
    k, t, h, d = o_parts.shape
    checks.require(
        o_parts[0].is_contiguous() and lse_parts[0].is_contiguous(),
        "stacked partials must be contiguous per part",
    )
    o = out if out is not None else torch.empty((t, h, d), dtype=out_dtype, device=o_parts.device)
    lse = lse_out if lse_out is not None else torch.empty((t, h), dtype=torch.float32, device=o_parts.device)
    n_rows = t * h
    if n_rows == 0:
        return o, lse
    block_r = 16 if interpreting() else max(1, min(64, 4096 // triton.next_power_of_2(d)))
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        o_parts,
        lse_parts,
        o,
        lse,
        n_rows,
        k,
        o_parts.stride(0) if k > 1 else n_rows * d,
        lse_parts.stride(0) if k > 1 else n_rows,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_R=block_r,
        num_warps=4,
    )
    return o, lse


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Triton version of `kernels.merge_partials` (same contract)."""
    checks.partials(outs, lses)
    from esp_serve.kernels.triton_common import device_ok

    checks.require(device_ok(outs[0]), f"triton kernels need CUDA tensors (got {outs[0].device})")
    dtype = outs[0].dtype if all(x.dtype == outs[0].dtype for x in outs) else torch.float32
    o_parts = torch.stack([x.to(dtype).contiguous() for x in outs])  # [k, T, H, D]
    lse_parts = torch.stack([x.float().contiguous() for x in lses])  # [k, T, H]
    return merge_stacked(o_parts, lse_parts, outs[0].dtype)
