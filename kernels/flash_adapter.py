"""flash-attn adapter: a varlen ring step on `flash_attn_varlen_func` (when it imports).

flash-attn knows one causal mask: *bottom-right* aligned, query i (of Lq) sees key j (of
Lk) iff j <= i + Lk - Lq. Our mask is on global positions. It maps exactly when each
request's positions are arithmetic progressions with one common stride P:

    q_pos[i] = a + i P (i < Lq),   k_pos[j] = b + j P (j < Lk).

Derivation. Query i sees key j iff a + iP >= b + jP iff (i - j) P >= b - a iff
i - j >= ceil((b - a) / P) iff j <= i + delta, with delta = floor((a - b) / P).
* Striped ring step (architecture.md §3.1): rank r holds positions g = c_r, c_r + P, ... with
  c_r = (r - s) mod P for start offset s, so |a - b| < P and delta is 0 when a >= b
  (causal: the same local index is visible) and -1 when a < b (strictly causal: local
  query i sees local keys j < i). With s = 0, a >= b is r' <= r: "a query of rank r
  sees the key of rank r' with the same local index iff r' <= r"; with a rotated start
  offset the comparison is on c_r, not on r.
* Rows with i + delta < 0 see nothing: drop the first `drop = max(0, -delta)` queries
  (o = 0, lse = -inf). The kept queries i' = i - drop see j <= i' + delta' with
  delta' = delta + drop >= 0.
* Keys j >= Lq' + delta' are seen by no kept row: keep the first Lk' = Lq' + delta' keys.
  Then Lk' - Lq' = delta' and bottom-right causal is exactly j <= i' + delta'. This
  needs Lk >= Lq' + delta' (true for striped steps, where Lk >= Lq - drop, and for a
  contiguous chunk after its cached prefix, whose keys end at its last query); when it
  fails, or positions are not progressions, or a request has several strides, the call
  falls back to the Triton kernel.
Dropping rows and keys needs a gather (a copy of q/k/v, linear in tokens); calls that
need none pass the tensors through untouched. Non-causal calls map directly.

flash-attn's softmax_lse is the natural-log LSE of scaled scores (our convention), shape
[Hq, Tq] (or [B, Hq, max_seqlen_q] in older releases); rows it found empty carry +inf and
are mapped to -inf here. It takes fp16/bf16 and head_dim <= 256, a multiple of 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esp_serve.kernels import checks
from esp_serve.kernels.host_layout import device_ints

try:
    from flash_attn import flash_attn_varlen_func

    HAVE_FLASH = True
except Exception:  # ImportError, or a CUDA library mismatch at import time
    flash_attn_varlen_func = None
    HAVE_FLASH = False

NEG_INF = float("-inf")


@dataclass(frozen=True)
class StepPlan:
    """How one varlen call maps onto bottom-right causal flash attention."""

    drop: list[int]  # leading queries of each request that see no key
    keep_k: list[int]  # leading keys of each request that some kept query sees
    identity: bool  # nothing dropped or truncated: pass tensors through


def plan_causal(q_pos, k_pos, cq: list[int], ck: list[int], host_q=None, host_k=None) -> StepPlan | None:
    """The mapping above for every request, or None if some request is inexpressible.
    With both sides' progressions known on the host (`HostSeqs.first/step`) nothing is
    read from the device; otherwise the positions are checked there (one read)."""
    if host_q is not None and host_k is not None and host_q.progressions and host_k.progressions:
        rows = _host_progressions(host_q, host_k, cq, ck)
    else:
        rows = _device_progressions(q_pos, k_pos, cq, ck)
    return _plan(rows, cq, ck)


def _host_progressions(host_q, host_k, cq: list[int], ck: list[int]) -> list[tuple[int, int, int, bool]]:
    """(a, b, stride, ok) per request from the callers' host progressions."""
    rows = []
    for b in range(len(cq) - 1):
        n_q, n_k = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        a, k0 = host_q.first[b], host_k.first[b]
        if n_q >= 2 and n_k >= 2:
            stride, ok = host_q.step, host_q.step == host_k.step
        elif n_q >= 2 or n_k >= 2:
            stride, ok = (host_q.step if n_q >= 2 else host_k.step), True
        else:  # one query and one key: any stride fits (see _device_progressions)
            stride, ok = abs(a - k0) + 1, True
        rows.append((a, k0, stride, ok and stride >= 1))
    return rows


def _device_progressions(q_pos, k_pos, cq: list[int], ck: list[int]) -> list[tuple[int, int, int, bool]]:
    """(a, b, stride, ok) per request, checked on the positions' device (one read)."""
    n_req = len(cq) - 1
    dev = q_pos.device
    cq_t = torch.tensor(cq, dtype=torch.int64, device=dev)
    ck_t = torch.tensor(ck, dtype=torch.int64, device=dev)
    n_q, n_k = cq_t[1:] - cq_t[:-1], ck_t[1:] - ck_t[:-1]
    qp, kp = q_pos.long(), k_pos.long()
    tq, tk = qp.numel(), kp.numel()

    def first_two(pos, starts, n):  # position of element 0 and stride to element 1
        idx0 = torch.clamp(starts[:-1], max=max(pos.numel() - 1, 0))
        idx1 = torch.clamp(starts[:-1] + 1, max=max(pos.numel() - 1, 0))
        p0 = pos[idx0] if pos.numel() else torch.zeros(n_req, dtype=torch.int64, device=dev)
        p1 = pos[idx1] if pos.numel() else p0
        return p0, torch.where(n >= 2, p1 - p0, 0)

    a, pq = first_two(qp, cq_t, n_q)
    b, pk = first_two(kp, ck_t, n_k)
    # One query and one key: any stride fits; |a - b| + 1 makes delta 0 or -1 (seen or not).
    stride = torch.where(n_q >= 2, pq, torch.where(n_k >= 2, pk, (a - b).abs() + 1))
    ok = (stride >= 1) & ((n_q < 2) | (n_k < 2) | (pq == pk))
    # every position on its progression (checked on device, one transfer at the end)
    req_q = torch.repeat_interleave(torch.arange(n_req, device=dev), n_q, output_size=tq)
    req_k = torch.repeat_interleave(torch.arange(n_req, device=dev), n_k, output_size=tk)
    bad_q = qp != a[req_q] + (torch.arange(tq, device=dev) - cq_t[req_q]) * stride[req_q]
    bad_k = kp != b[req_k] + (torch.arange(tk, device=dev) - ck_t[req_k]) * stride[req_k]
    ok = ok & (torch.zeros(n_req, dtype=torch.int64, device=dev).index_add_(0, req_q, bad_q.long()) == 0)
    ok = ok & (torch.zeros(n_req, dtype=torch.int64, device=dev).index_add_(0, req_k, bad_k.long()) == 0)
    return [
        (a_b, b_b, p_b, bool(ok_b))
        for a_b, b_b, p_b, ok_b in torch.stack([a, b, stride, ok.long()], 1).tolist()
    ]


def _plan(rows, cq: list[int], ck: list[int]) -> StepPlan | None:
    """Drops and key counts per request from its (a, b, stride, ok), all host ints."""
    drop, keep_k = [], []
    for (a_b, b_b, p_b, ok_b), (q0, q1), (k0, k1) in zip(rows, zip(cq, cq[1:]), zip(ck, ck[1:])):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            drop.append(lq)
            keep_k.append(0)
            continue
        if not ok_b:
            return None
        delta = (a_b - b_b) // p_b  # floor division: exact for negative differences too
        d = min(lq, max(0, -delta))
        lq_kept = lq - d
        need = lq_kept + delta + d
        if lq_kept > 0 and lk < need:
            return None
        drop.append(d)
        keep_k.append(min(lk, need) if lq_kept > 0 else 0)
    identity = all(d == 0 for d in drop) and keep_k == [y - x for x, y in zip(ck, ck[1:])]
    return StepPlan(drop, keep_k, identity)


def supports(q: torch.Tensor) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
    )


def _keep_rows(cu: list[int], counts: list[int], from_start: bool, device) -> torch.Tensor:
    """Row indices [kept] int64: per request, the first counts[b] rows (from_start) or all
    but them. Built on the host (the counts are host ints) and copied without a wait."""
    rows: list[int] = []
    for (x, y), n in zip(zip(cu, cu[1:]), counts):
        rows.extend(range(x, min(y, x + n)) if from_start else range(min(y, x + n), y))
    return device_ints(rows, device, torch.int64)


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
    fn=None,
    host_q=None,
    host_k=None,
):
    """flash-attn version of `kernels.varlen_attention`, or None when the call cannot be
    expressed (the caller then uses Triton). `fn` replaces flash_attn_varlen_func (tests).
    host_q/host_k (`HostSeqs`): with offsets and progressions given, nothing is read back."""
    cq, ck = checks.varlen(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, host_q, host_k)
    fn = fn or flash_attn_varlen_func
    if fn is None:
        return None
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    tq, hq, d = q.shape
    if not causal:
        plan = StepPlan([0] * (len(cq) - 1), [y - x for x, y in zip(ck, ck[1:])], True)
    else:
        plan = plan_causal(q_pos, k_pos, cq, ck, host_q, host_k)
        if plan is None:
            return None
    if plan.identity:
        q2, k2, v2, cq2, ck2 = q, k, v, cq, ck
        keep_q = None
        cu_q2 = cu_seqlens_q.to(torch.int32)  # the caller's offsets: no host copy needed
        cu_k2 = cu_seqlens_k.to(torch.int32)
    else:
        keep_q = _keep_rows(cq, plan.drop, False, q.device)
        keep_k = _keep_rows(ck, plan.keep_k, True, q.device)
        q2, k2, v2 = q.index_select(0, keep_q), k.index_select(0, keep_k), v.index_select(0, keep_k)
        lens_q = [y - x - dr for x, y, dr in zip(cq, cq[1:], plan.drop)]
        cq2 = [0]
        for n in lens_q:
            cq2.append(cq2[-1] + n)
        ck2 = [0]
        for n in plan.keep_k:
            ck2.append(ck2[-1] + n)
        cu_q2 = device_ints(cq2, q.device)
        cu_k2 = device_ints(ck2, q.device)
    if q2.shape[0] == 0 or k2.shape[0] == 0:  # nothing visible anywhere
        return (
            torch.zeros(q.shape, dtype=q.dtype, device=q.device),
            torch.full((tq, hq), NEG_INF, dtype=torch.float32, device=q.device),
        )
    max_q = max(y - x for x, y in zip(cq2, cq2[1:]))
    max_k = max(y - x for x, y in zip(ck2, ck2[1:]))
    out, lse2, _ = fn(
        q2.contiguous(),
        k2.contiguous(),
        v2.contiguous(),
        cu_q2,
        cu_k2,
        max_q,
        max_k,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    if lse2.dim() == 3:  # older flash-attn: [B, Hq, max_seqlen_q], padded per request
        lse2 = torch.cat([lse2[i, :, : y - x] for i, (x, y) in enumerate(zip(cq2, cq2[1:]))], dim=1)
    lse2 = lse2.float().transpose(0, 1)  # [Tq', Hq]
    empty = ~torch.isfinite(lse2)  # +inf marks rows without keys
    lse2 = lse2.masked_fill(empty, NEG_INF)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    if keep_q is None:
        return out, lse2
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # dropped rows: (0, -inf)
    lse = torch.full((tq, hq), NEG_INF, dtype=torch.float32, device=q.device)
    o.index_copy_(0, keep_q, out)
    lse.index_copy_(0, keep_q, lse2)
    return o, lse
