"""Builders of attention inputs shared by the kernel tests (torch only, any device).

A request of L tokens at global positions base..base+L-1 is striped over P ranks: token g
lives on rank (g + s) mod P, where s is the request's start offset (rotated per request,
architecture.md §3.1). A ring step pairs the queries of rank rq with the keys of rank rk.
"""

from __future__ import annotations

import torch

from esp_serve.kernels.host_layout import HostSeqs


def rank_positions(length: int, base: int, P: int, s: int, rank: int) -> torch.Tensor:
    g = torch.arange(base, base + length, dtype=torch.int64)
    return g[(g + s) % P == rank]


def cu(lengths) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out


def qkv(tq: int, tk: int, hq: int, hkv: int, d: int, dtype, gen, device="cpu"):
    q = torch.randn(tq, hq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(tk, hkv, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(tk, hkv, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def striped_step(lengths, P, rq, rk, hq, hkv, d, dtype, seed, bases=None, device="cpu"):
    """One ring step of a striped batch: queries of rank rq vs keys of rank rk.

    Each request b gets start offset s_b = b mod P (rotated) and base position bases[b]
    (0 by default; > 0 models a re-prefill or a chunk after cached tokens).
    Returns q, k, v, q_pos, k_pos, cu_q, cu_k.
    """
    gen = torch.Generator().manual_seed(seed)
    bases = bases or [0] * len(lengths)
    qp = [rank_positions(L, base, P, b % P, rq) for b, (L, base) in enumerate(zip(lengths, bases))]
    kp = [rank_positions(L, base, P, b % P, rk) for b, (L, base) in enumerate(zip(lengths, bases))]
    q_pos, k_pos = torch.cat(qp), torch.cat(kp)
    q, k, v = qkv(len(q_pos), len(k_pos), hq, hkv, d, dtype, gen, device)
    return (
        q,
        k,
        v,
        q_pos.to(device),
        k_pos.to(device),
        cu([len(x) for x in qp]).to(device),
        cu([len(x) for x in kp]).to(device),
    )


def slot_case(n_queries, n_slots, hq, hkv, d, dtype, seed, pool=None, device="cpu"):
    """A pool and per-request slot lists: request b has n_queries[b] queries and sees
    n_slots[b] distinct slots in random order. Returns q, cu_q, kv_layer, slot_ids, cu_s."""
    gen = torch.Generator().manual_seed(seed)
    pool = pool or max(1, sum(n_slots) + 7)
    kv_layer = torch.randn(pool, 2, hkv, d, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(sum(n_queries), hq, d, generator=gen).to(device=device, dtype=dtype)
    perm = torch.randperm(pool, generator=gen)
    ids, used = [], 0
    for n in n_slots:  # disjoint per request, like a real pool, in random order
        ids.append(perm[used : used + n])
        used += n
    slot_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    return (q, cu(n_queries).to(device), kv_layer, slot_ids.to(device), cu(n_slots).to(device))


def host_layout(cu_t: torch.Tensor, pos: torch.Tensor | None = None, step: int | None = None) -> HostSeqs:
    """The host copy a caller passes beside offsets cu_t [B+1] (and, with `step`, beside
    positions that advance by `step` within each request). Reads the tensors: build it
    before counting host reads."""
    cu_host = cu_t.tolist()
    if pos is None or step is None:
        return HostSeqs.of(cu_host)
    p = pos.tolist()
    return HostSeqs.of(cu_host, [p[a] if a < b else 0 for a, b in zip(cu_host, cu_host[1:])], step)
