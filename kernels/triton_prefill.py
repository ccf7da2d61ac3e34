"""Triton flash-attention forward for varlen prefill and ring steps, returning LSE.

Reads like Triton's fused-attention tutorial: a bounds kernel, the attention kernel, the
wrapper. What differs from the tutorial:

* The causal mask is on *global* positions (`q_pos[i] >= k_pos[j]`), so one kernel serves
  contiguous prefill, chunks after cached tokens and every step of a striped ring.
* Tiles are classified per request and per 64-row query chunk by a small bounds kernel:
  keys before `full_end` are visible to every row of the chunk (no mask needed), keys
  from `end` on are hidden from every row (never loaded). The main loop runs unmasked
  tiles, then masked ones, like the tutorial's two stages. The bounds are exact for any
  key order and tight for monotone positions (contiguous and striped layouts), where
  tiles beyond the diagonal are skipped entirely.
* GQA: query head h reads kv head h // GROUP. Varlen: one program per (query block, head,
  request), offsets from cu_seqlens.
* exp2 inside (scores pre-multiplied by scale * log2 e); LSE leaves in natural log.
  Rows without a visible key end with l = 0 and store o = 0, lse = -inf; the update uses
  a guarded max so exp2(-inf - -inf) never happens.
* ACCUMULATE merges the result into (o, lse) already in the output buffers (ring
  attention's running state) in the epilogue, saving a separate merge pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from esp_serve.kernels import checks
from esp_serve.kernels.triton_common import HEAD_DIMS, LN2, LOG2E, autotuned, dot_precision, interpreting

# Query rows per bounds chunk; every BLOCK_M below is a multiple of it.
BOUND_CHUNK = 16 if interpreting() else 64
LN2_C = tl.constexpr(LN2)


def _configs():
    if interpreting():  # one small config: the interpreter is ~700x slower than a GPU
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # (BLOCK_M, BLOCK_N, warps, stages). 128-row blocks take 8 warps: with 4, head_dim 128
    # spills registers on sm_90 (see kernels/compile_check.py).
    shapes = [
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 32, 4, 4),
    ]
    return autotuned(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    )


def _prune(configs, named_args, **kwargs):
    """Drop configs known to be bad before timing them (kernels/compile_check.py):
    head_dim 256 leaves no shared memory for 128-key tiles, and before Hopper 128-row
    blocks at head_dim >= 128 spill registers (sm_80: 64-168 bytes of stack)."""
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    pre_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9
    kept = [
        c
        for c in configs
        if (d < 256 or c.kwargs["BLOCK_N"] <= 64)
        and not (pre_hopper and d >= 128 and c.kwargs["BLOCK_M"] >= 128)
    ]
    return kept or configs[:1]


# --------------------------------------------------------------------------- bounds
@triton.jit
def _causal_bounds_kernel(
    QPOS, KPOS, CU_Q, CU_K, FULL_END, END, max_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    """Per (query chunk c, request b): FULL_END = first key index visible to not every
    row of the chunk (keys before it need no mask), END = 1 + last key index visible to
    some row (keys from it on are never loaded)."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    q0 = tl.load(CU_Q + b)
    n_q = tl.load(CU_Q + b + 1) - q0
    k0 = tl.load(CU_K + b)
    n_k = tl.load(CU_K + b + 1) - k0
    if c * CHUNK < n_q:
        rows = c * CHUNK + tl.arange(0, CHUNK)
        ok = rows < n_q
        qp = tl.load(QPOS + q0 + rows, mask=ok, other=0).to(tl.int64)
        qmin = tl.min(tl.where(ok, qp, 1 << 62), axis=0)
        qmax = tl.max(tl.where(ok, qp, -(1 << 62)), axis=0)
        full_end = n_k
        end = n_k * 0
        for s in range(0, n_k, BLOCK):
            j = s + tl.arange(0, BLOCK)
            okj = j < n_k
            kp = tl.load(KPOS + k0 + j, mask=okj, other=0).to(tl.int64)
            full_end = tl.minimum(full_end, tl.min(tl.where(okj & (kp > qmin), j, n_k), axis=0))
            end = tl.maximum(end, tl.max(tl.where(okj & (kp <= qmax), j + 1, 0), axis=0))
        tl.store(FULL_END + b * max_chunks + c, full_end)
        tl.store(END + b * max_chunks + c, end)


# --------------------------------------------------------------------------- attention
@triton.jit
def _tile(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    start_n,
    n_k,
    qpos,
    KPOS,
    k0,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One key tile (keys start_n .. start_n + BLOCK_N of the request): scores, mask
    (stage 2 only), online-softmax update in base 2.

    k_ptrs [D, BLOCK_N] (K^T) / v_ptrs [BLOCK_N, D] point at the tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_k
    if MASKED:
        kt = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        kt = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if DOT_PREC == "ieee":
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [M, N] fp32, log2 units
    if MASKED:
        visible = n_ok[None, :]
        if IS_CAUSAL:
            kpos = tl.load(KPOS + k0 + offs_n, mask=n_ok, other=0).to(tl.int64)
            visible = visible & (qpos[:, None] >= kpos[None, :])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp2(-inf - -inf)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


# restore_value: tuning runs the kernel once per config; with ACCUMULATE it must start from
# the caller's running state every time.
@triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM", "IS_CAUSAL", "GROUP", "seq_bucket"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["O", "LSE"],
)
@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    QPOS,
    KPOS,
    CU_Q,
    CU_K,
    FULL_END,
    END,
    O,
    LSE,
    qk_scale,
    max_chunks,
    seq_bucket,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Last query blocks first: under a causal mask they have the most keys, so the
    # longest programs start early and the tail of the launch is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0 = tl.load(CU_Q + b)
    n_q = tl.load(CU_Q + b + 1) - q0
    k0 = tl.load(CU_K + b)
    n_k = tl.load(CU_K + b + 1) - k0
    if pid_m * BLOCK_M < n_q:
        hk = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_ok = offs_m < n_q
        rows = (q0 + offs_m).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0
        )
        if DOT_PREC == "ieee":
            q = q.to(tl.float32)
        qpos = tl.load(QPOS + q0 + offs_m, mask=m_ok, other=0).to(tl.int64)

        # Key range of this block: [0, full_end) visible to all rows, [full_end, end) mixed.
        full_end = n_k
        end = n_k
        if IS_CAUSAL:  # a block covers BLOCK_M // CHUNK bound chunks: widest range wins
            end = n_k * 0
            first = pid_m * (BLOCK_M // CHUNK)
            for c in tl.static_range(BLOCK_M // CHUNK):
                chunk_ok = (first + c) * CHUNK < n_q
                fe = tl.load(FULL_END + b * max_chunks + first + c, mask=chunk_ok, other=n_k)
                en = tl.load(END + b * max_chunks + first + c, mask=chunk_ok, other=0)
                full_end = tl.minimum(full_end, fe)
                end = tl.maximum(end, en)
        unmasked_end = tl.minimum(full_end, end) // BLOCK_N * BLOCK_N

        # Loop-invariant tile offsets (int32, small): K^T tile [D, N], V tile [N, D].
        kt_off = offs_d[:, None] + offs_n[None, :] * stride_kt
        v_off = offs_n[:, None] * stride_vt + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Each tile's pointers from a scalar 64-bit base: pointer *tensors* carried through
        # the loops ([D, N] and [N, D] of 64-bit addresses) made every head_dim-128 config
        # spill 0.5-2 KB of registers to the stack on sm_90 (Triton 3.6/3.7, compile_check).
        k_head = K + hk * stride_kh
        v_head = V + hk * stride_vh
        for start_n in range(0, unmasked_end, BLOCK_N):  # stage 1: full tiles, no mask
            acc, m_i, l_i = _tile(
                acc,
                m_i,
                l_i,
                q,
                k_head + (k0 + start_n).to(tl.int64) * stride_kt + kt_off,
                v_head + (k0 + start_n).to(tl.int64) * stride_vt + v_off,
                start_n,
                n_k,
                qpos,
                KPOS,
                k0,
                qk_scale,
                BLOCK_N,
                False,
                IS_CAUSAL,
                DOT_PREC,
            )
        for start_n in range(unmasked_end, end, BLOCK_N):  # stage 2: diagonal / tail tiles
            acc, m_i, l_i = _tile(
                acc,
                m_i,
                l_i,
                q,
                k_head + (k0 + start_n).to(tl.int64) * stride_kt + kt_off,
                v_head + (k0 + start_n).to(tl.int64) * stride_vt + v_off,
                start_n,
                n_k,
                qpos,
                KPOS,
                k0,
                qk_scale,
                BLOCK_N,
                True,
                IS_CAUSAL,
                DOT_PREC,
            )

        has = l_i > 0.0
        lse = tl.where(
            has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * LN2_C, float("-inf")
        )  # natural log at the boundary
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        o_ptr = O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        l_ptr = LSE + rows * stride_lt + h * stride_lh
        if ACCUMULATE:  # merge into the running (o, lse) held in the output buffers
            lse_old = tl.load(l_ptr, mask=m_ok, other=float("-inf"))
            m = tl.maximum(lse_old, lse)
            m = tl.where(m == float("-inf"), 0.0, m)
            w_old = tl.exp(lse_old - m)
            w_new = tl.exp(lse - m)
            tot = w_old + w_new
            has = tot > 0.0
            o_old = tl.load(o_ptr, mask=m_ok[:, None] & (lse_old > float("-inf"))[:, None], other=0.0).to(
                tl.float32
            )
            denom = tl.where(has, tot, 1.0)
            o = (o_old * w_old[:, None] + o * w_new[:, None]) / denom[:, None]
            lse = tl.where(has, m + tl.log(denom), float("-inf"))
        tl.store(o_ptr, o.to(O.dtype.element_ty), mask=m_ok[:, None])
        tl.store(l_ptr, lse, mask=m_ok)


# --------------------------------------------------------------------------- wrapper
def supports(q: torch.Tensor) -> bool:
    return q.shape[-1] in HEAD_DIMS


def _check_device(*ts):
    from esp_serve.kernels.triton_common import device_ok

    for t in ts:
        checks.require(
            device_ok(t), f"triton kernels need CUDA tensors (got {t.device}); use the torch backend on CPU"
        )


def varlen_attention(
    q,
    k,
    v,
    q_pos,
    k_pos,
    cu_seqlens_q,
    cu_seqlens_k,
    scale=None,
    causal=True,
    *,
    out=None,
    lse_out=None,
    host_q=None,
    host_k=None,
):
    """Triton version of `kernels.varlen_attention` (same contract and shapes).

    With `out`/`lse_out` given ([Tq, Hq, D] any float dtype, [Tq, Hq] fp32), the result is
    merged into them in place (attention_accumulate) and they are returned. host_q/host_k:
    host copies of the offsets; the grid (max lengths) comes from them.
    """
    cq, ck = checks.varlen(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, host_q, host_k)
    _check_device(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k)
    d = q.shape[2]
    checks.require(supports(q), f"triton kernels take head_dim in {HEAD_DIMS}, got {d}")
    checks.require(
        q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1,
        "q/k/v need a contiguous last (head_dim) dimension",
    )
    accumulate = out is not None
    out, lse_out = _outputs(q, out, lse_out)
    n_req = len(cq) - 1
    if q.shape[0] == 0 or n_req == 0:
        return out, lse_out
    checks.require(n_req <= 65535, "at most 65535 requests per call (grid axis 2)")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    max_q = max(b - a for a, b in zip(cq, cq[1:]))
    max_k = max(b - a for a, b in zip(ck, ck[1:]))
    max_chunks = max(1, triton.cdiv(max_q, BOUND_CHUNK))
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    if causal:
        full_end, end = _causal_bounds(q_pos, k_pos, cu_q, cu_k, n_req, max_chunks)
    else:
        full_end = end = cu_k  # unused (IS_CAUSAL=False); any int32 tensor will do
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), q.shape[1], n_req)  # noqa: E731
    _prefill_kernel[grid](
        q, k, v, q_pos, k_pos, cu_q, cu_k, full_end, end, out, lse_out,
        scale * LOG2E, max_chunks, _bucket(max(max_q, max_k)),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=d,
        IS_CAUSAL=causal,
        ACCUMULATE=accumulate,
        DOT_PREC=dot_precision(q.dtype),
        CHUNK=BOUND_CHUNK,
    )  # fmt: skip
    return out, lse_out


def _outputs(q, out, lse_out):
    """The output buffers: fresh ones, or the caller's to merge into (accumulate mode)."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [Tq, Hq, D]
        lse_out = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [Tq, Hq]
        return out, lse_out
    checks.require(
        lse_out is not None
        and out.shape == q.shape
        and lse_out.shape == q.shape[:2]
        and lse_out.dtype == torch.float32
        and out.stride(2) == 1,
        "accumulate needs out [Tq, Hq, D] and lse_out [Tq, Hq] fp32",
    )
    return out, lse_out


def _causal_bounds(q_pos, k_pos, cu_q, cu_k, n_req: int, max_chunks: int):
    """Per request and query chunk: where the fully visible keys end and where visible keys end
    (both [n_req, max_chunks] int32), so the main kernel skips masking on full blocks."""
    full_end = torch.empty((n_req, max_chunks), dtype=torch.int32, device=q_pos.device)
    end = torch.empty_like(full_end)
    _causal_bounds_kernel[(max_chunks, n_req)](
        q_pos, k_pos, cu_q, cu_k, full_end, end, max_chunks,
        CHUNK=BOUND_CHUNK,
        BLOCK=64 if interpreting() else 1024,
    )  # fmt: skip
    return full_end, end


def _bucket(n: int) -> int:
    """Autotune key: the power of two at or above n (tune once per size class)."""
    return 1 << max(0, (n - 1).bit_length())
