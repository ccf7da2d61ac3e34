"""Tiny dense attention: the ground truth that every backend is tested against.

Obviously correct, not fast: one request at a time, the full [heads, Tq, Tk] score matrix
in fp32, the mask built from global positions. Never used in production (see
`kernels/reference.py` for the torch production path). Conventions (architecture.md §3.1):
* `lse = log(sum_k exp(q.k * scale))`, natural log of *scaled* scores, fp32 `[T, Hq]`;
  `o` is the softmax-weighted output.
* A query with no visible key has `o = 0` and `lse = -inf`; merges never produce NaN.
* GQA/MQA: query head h uses kv head `h // (q_heads // kv_heads)`.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[tokens, kv_heads, dim] -> [tokens, q_heads, dim] by repeating each kv head."""
    group = num_q_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention of one sequence, fp32 math.

    q [Tq, Hq, D], k/v [Tk, Hkv, D], mask [Tq, Tk] bool (True = visible) or None.
    Returns o [Tq, Hq, D] fp32, lse [Tq, Hq] fp32.
    """
    k = _expand_kv(k, q.shape[1])
    v = _expand_kv(v, q.shape[1])
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(0), NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [H, Tq]
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, torch.zeros_like(probs))
    o = torch.einsum("hqk,khd->qhd", probs, v.float())  # [Tq, H, D]
    return o, lse.transpose(0, 1).contiguous()


def varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=None, causal=True):
    """Same contract as `kernels.varlen_attention`; returns o in fp32 (not q's dtype)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs or ke == ks:
            continue
        mask = (q_pos[qs:qe, None] >= k_pos[None, ks:ke]) if causal else None
        o[qs:qe], lse[qs:qe] = attend(q[qs:qe], k[ks:ke], v[ks:ke], mask, scale)
    return o, lse


def slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=None):
    """Same contract as `kernels.slot_attention`; returns o in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    cq, cs = cu_seqlens_q.tolist(), cu_slots.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ss, se = cq[b], cq[b + 1], cs[b], cs[b + 1]
        if qe == qs or se == ss:
            continue
        kv = kv_layer[slot_ids[ss:se]]  # [n, 2, Hkv, D]
        o[qs:qe], lse[qs:qe] = attend(q[qs:qe], kv[:, 0], kv[:, 1], None, scale)
    return o, lse


def merge_partials(outs, lses):
    """Guarded LSE merge, written out term by term (fp32 result)."""
    lse_stack = torch.stack([x.float() for x in lses])  # [k, T, H]
    m = lse_stack.max(dim=0).values
    o = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    w_sum = torch.zeros_like(m)
    for o_i, lse_i in zip(outs, lse_stack):
        w = torch.where(torch.isfinite(lse_i), torch.exp(lse_i - torch.where(torch.isfinite(m), m, 0.0)), 0.0)
        o += w.unsqueeze(-1) * torch.where(torch.isfinite(lse_i).unsqueeze(-1), o_i.float(), 0.0)
        w_sum += w
    has_keys = w_sum > 0
    o = torch.where(has_keys.unsqueeze(-1), o / torch.where(has_keys, w_sum, 1.0).unsqueeze(-1), 0.0)
    lse = torch.where(has_keys, m + torch.log(torch.where(has_keys, w_sum, 1.0)), NEG_INF)
    return o, lse
