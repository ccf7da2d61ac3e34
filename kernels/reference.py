"""Plain-torch attention with log-sum-exp: the ground truth for every other backend,
and the CPU production path.

Conventions (DESIGN 3.1), shared by every backend:
* `lse = log(sum_k exp(q.k * scale))` in natural log of *scaled* scores, fp32,
  shape `[tokens, q_heads]`; `o` is the normalised (softmax-weighted) output.
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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention of one sequence, fp32 math.

    q [Tq, H, D], k/v [Tk, H, D] (already expanded), mask [Tq, Tk] bool (True = visible).
    Returns o [Tq, H, D] fp32, lse [Tq, H] fp32.
    """
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(0), NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [H, Tq]
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, torch.zeros_like(probs))
    o = torch.einsum("hqk,khd->qhd", probs, v.float())  # [Tq, H, D]
    return o, lse.transpose(0, 1).contiguous()


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results of the same queries: o_i [T, H, D], lse_i [T, H] -> (o, lse).

    m = max lse_i; a row with m = -inf has no keys anywhere -> (0, -inf). Otherwise
    w_i = exp(lse_i - m), lse = m + log sum w_i, o = sum w_i o_i / sum w_i. Partials with
    lse = -inf get weight exactly 0 (their o is ignored even if it holds garbage).
    """
    assert len(outs) == len(lses) and outs, "need at least one partial"
    lse_stack = torch.stack([x.float() for x in lses])  # [k, T, H]
    m = lse_stack.max(dim=0).values  # [T, H]
    finite = torch.isfinite(m)
    m_safe = torch.where(finite, m, torch.zeros_like(m))
    w = torch.exp(lse_stack - m_safe.unsqueeze(0))  # exp(-inf) = 0 for empty partials
    w = torch.where(torch.isfinite(lse_stack), w, torch.zeros_like(w))
    w_sum = w.sum(dim=0)  # [T, H]
    o = torch.zeros_like(outs[0], dtype=torch.float32)
    for w_i, o_i in zip(w, outs):
        o_i = torch.nan_to_num(o_i.float(), nan=0.0, posinf=0.0, neginf=0.0)
        o += w_i.unsqueeze(-1) * o_i
    denom = torch.where(finite, w_sum, torch.ones_like(w_sum))
    o = torch.where(finite.unsqueeze(-1), o / denom.unsqueeze(-1), torch.zeros_like(o))
    lse = torch.where(finite, m_safe + torch.log(denom), torch.full_like(m, NEG_INF))
    return o.to(outs[0].dtype), lse


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_pos: torch.Tensor, k_pos: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     scale: float | None = None, causal: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a varlen batch with masks on global positions.

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; q_pos [Tq], k_pos [Tk] int64 global positions;
    cu_seqlens_q/k [B+1] int offsets of each request's tokens. Query i of request b sees
    key j of request b iff `q_pos[i] >= k_pos[j]` (causal) or always (causal=False).
    Returns o [Tq, Hq, D] (dtype of q), lse [Tq, Hq] fp32.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs or ke == ks:
            continue
        kb = _expand_kv(k[ks:ke], num_q_heads)
        vb = _expand_kv(v[ks:ke], num_q_heads)
        mask = (q_pos[qs:qe, None] >= k_pos[None, ks:ke]) if causal else None
        o[qs:qe], lse[qs:qe] = _attend(q[qs:qe], kb, vb, mask, scale)
    return o.to(q.dtype), lse


def slot_attention(q: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_layer: torch.Tensor,
                   slot_ids: torch.Tensor, cu_slots: torch.Tensor,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of queries over KV gathered from a token-slot pool, no mask.

    q [Tq, Hq, D] (decode: one query per request); kv_layer [slots, 2, Hkv, D] is one
    layer of the pool; slot_ids [S] int64 lists, request after request, the slots whose
    tokens each request's queries see (any order, any subset: every listed token is
    older than the queries); cu_slots [B+1] offsets into slot_ids. A request with no
    slots gets o = 0, lse = -inf.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    cq, cs = cu_seqlens_q.tolist(), cu_slots.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ss, se = cq[b], cq[b + 1], cs[b], cs[b + 1]
        if qe == qs or se == ss:
            continue
        kv = kv_layer.index_select(0, slot_ids[ss:se])  # [n, 2, Hkv, D]
        kb = _expand_kv(kv[:, 0], num_q_heads)
        vb = _expand_kv(kv[:, 1], num_q_heads)
        o[qs:qe], lse[qs:qe] = _attend(q[qs:qe], kb, vb, None, scale)
    return o.to(q.dtype), lse


def write_kv(kv_layer: torch.Tensor, slot_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k/v [n, Hkv, D] into slots slot_ids [n] of kv_layer [slots, 2, Hkv, D]."""
    kv_layer[slot_ids, 0] = k.to(kv_layer.dtype)
    kv_layer[slot_ids, 1] = v.to(kv_layer.dtype)
