"""Shared-prefix (cascade) attention over a token-slot pool.

Prefix-cache readers list the very slots of their document's KV (`KVPool.share_prefix`),
so in one decode step several requests' slot lists start with the same slots. Attending
request by request reads that prefix once per reader. Here the step reads it once
(FlashInfer's cascade attention, vLLM's cascade attention):

1. every group of requests whose lists start with the same P slots gets one partial of
   all its members' queries, stacked ([queries of the group, Hq, D]), over those P slots:
   one "request" of `slot_attention` with several queries reads its keys once;
2. every request gets one partial over the rest of its slots (all of them outside a group);
3. the two partials merge by the LSE rule (`merge_partials`, exact with empty partials),
   the rule that already merges ring steps and multi-master decode partials.

The layout (`CascadeLayout.build`) is computed once per step on the host from the slot
lists as host ints, and reused by every layer. Every backend runs it: both partials are
plain `slot_attention` calls (the Triton slot kernel takes several queries per request),
so the GPU path reads a shared prefix once too. A step without shared prefixes gets no
layout (`build` returns None): callers keep the per-request call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esp_serve.kernels import api
from esp_serve.kernels.host_layout import HostSeqs

# Layouts built in this process and the slots they read once instead of once per reader:
# how tests (and anyone profiling a run) see that a step took the shared path.
STATS = {"layouts": 0, "shared_slots": 0}


def _common_prefix(lists: Sequence[Sequence[int]], bound: int) -> int:
    """Length of the longest common prefix of `lists`, at most `bound`. One slice
    comparison per list when the bound holds (the caller's hint), else a binary search."""

    def agree(n: int) -> bool:  # (slices of lists compare in C)
        head = lists[0][:n]
        return all(x[:n] == head for x in lists[1:])

    lo, hi = 0, min(bound, *(len(x) for x in lists))
    if agree(hi):
        return hi
    while hi - lo > 1:  # agree(lo) holds, agree(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if agree(mid) else (lo, mid)
    return lo


def shared_prefix_groups(
    slot_lists: Sequence[Sequence[int]], hints: Sequence[int] | None = None, min_shared: int = 1
) -> list[tuple[int, list[int]]]:
    """Groups of >= 2 requests whose slot lists start with the same `n >= min_shared`
    slots: [(n, member indices)]. Requests are grouped by their first slot, then `n` is
    the group's common prefix. `hints[b]`: an upper bound on request b's shared prefix
    (the pool's record of what it shares), 0 to leave b alone; None: no bound."""
    by_first: dict[int, list[int]] = {}
    for b, slots in enumerate(slot_lists):
        if len(slots) and (hints is None or hints[b] > 0):
            by_first.setdefault(int(slots[0]), []).append(b)
    out = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        bound = min(hints[b] for b in members) if hints is not None else len(slot_lists[members[0]])
        n = _common_prefix([slot_lists[b] for b in members], bound)
        if n >= min_shared:
            out.append((n, members))
    return out


def _cu(lengths: Sequence[int], device: torch.device) -> tuple[torch.Tensor, HostSeqs]:
    host = HostSeqs.from_lengths(lengths)
    return torch.tensor(host.cu, dtype=torch.int64, device=device), host


@dataclass(frozen=True)
class CascadeLayout:
    """One step's split of every request's slots into a shared prefix and the rest.

    prefix_rows [Qp] int64: query rows (into the step's q) of every group's members, group
    after group; prefix_cu_q [G+1] their offsets; prefix_slots [Sp] each group's prefix
    slots, prefix_cu_slots [G+1]. rest_slots [Sr] each request's slots past its group's
    prefix (all of them outside a group), rest_cu_slots [B+1]. Host copies beside each.
    """

    num_queries: int
    prefix_rows: torch.Tensor
    prefix_cu_q: torch.Tensor
    prefix_host_q: HostSeqs
    prefix_slots: torch.Tensor
    prefix_cu_slots: torch.Tensor
    prefix_host_slots: HostSeqs
    rest_slots: torch.Tensor
    rest_cu_slots: torch.Tensor
    rest_host_slots: HostSeqs
    shared_slots: int  # slots the step reads once instead of once per reader

    @classmethod
    def build(
        cls,
        slot_lists: Sequence[Sequence[int]],
        query_counts: Sequence[int],
        device: torch.device,
        hints: Sequence[int] | None = None,
        min_shared: int = 1,
        slot_tensors: Sequence[torch.Tensor] | None = None,
    ) -> CascadeLayout | None:
        """The layout of requests with these slot lists (host ints) and query counts;
        None when no two requests share a prefix. `slot_tensors`: the same lists as
        tensors on `device` (the pool's): the layout's slot tensors are cut from them on
        the device instead of built from host ints (no per-slot host work)."""
        groups = shared_prefix_groups(slot_lists, hints, min_shared)
        if not groups:
            return None
        q_start = [0]
        for n in query_counts:
            q_start.append(q_start[-1] + n)
        cut = [0] * len(slot_lists)  # slots of request b inside its group's prefix
        rows: list[int] = []
        group_q = []
        for n, members in groups:
            for b in members:
                cut[b] = n
                rows.extend(range(q_start[b], q_start[b + 1]))
            group_q.append(sum(query_counts[b] for b in members))
        if slot_tensors is None:
            slot_tensors = [torch.tensor(list(x), dtype=torch.int64, device=device) for x in slot_lists]
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        prefix = torch.cat([empty, *(slot_tensors[m[0]][:n].long() for n, m in groups)])
        rest = torch.cat([empty, *(t[c:].long() for t, c in zip(slot_tensors, cut))])
        prefix_cu_q, prefix_host_q = _cu(group_q, device)
        prefix_cu_slots, prefix_host_slots = _cu([n for n, _ in groups], device)
        rest_cu_slots, rest_host_slots = _cu([len(s) - c for s, c in zip(slot_lists, cut)], device)
        shared = sum(n * (len(m) - 1) for n, m in groups)
        STATS["layouts"] += 1
        STATS["shared_slots"] += shared
        return cls(
            num_queries=q_start[-1],
            prefix_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            prefix_cu_q=prefix_cu_q,
            prefix_host_q=prefix_host_q,
            prefix_slots=prefix,
            prefix_cu_slots=prefix_cu_slots,
            prefix_host_slots=prefix_host_slots,
            rest_slots=rest,
            rest_cu_slots=rest_cu_slots,
            rest_host_slots=rest_host_slots,
            shared_slots=shared,
        )


def cascade_slot_attention(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_layer: torch.Tensor,
    layout: CascadeLayout,
    scale: float | None = None,
    *,
    host_q: HostSeqs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`slot_attention` of q [Tq, Hq, D] over the slots `layout` was built from, each
    shared prefix read once for all its readers. -> (o [Tq, Hq, D] in q's dtype, lse
    [Tq, Hq] fp32)."""
    assert q.shape[0] == layout.num_queries, (q.shape, layout.num_queries)
    o_rest, lse_rest = api.slot_attention(
        q,
        cu_seqlens_q,
        kv_layer,
        layout.rest_slots,
        layout.rest_cu_slots,
        scale,
        host_q=host_q,
        host_slots=layout.rest_host_slots,
    )
    q_pre = q.index_select(0, layout.prefix_rows)  # [Qp, Hq, D]: the groups' queries, stacked
    o_pre, lse_pre = api.slot_attention(
        q_pre,
        layout.prefix_cu_q,
        kv_layer,
        layout.prefix_slots,
        layout.prefix_cu_slots,
        scale,
        host_q=layout.prefix_host_q,
        host_slots=layout.prefix_host_slots,
    )
    # back to the step's rows [Tq, ...]; rows outside a group keep an empty partial
    o_full = torch.zeros(o_rest.shape, dtype=torch.float32, device=q.device)
    lse_full = torch.full(lse_rest.shape, float("-inf"), dtype=torch.float32, device=q.device)
    o_full.index_copy_(0, layout.prefix_rows, o_pre.float())
    lse_full.index_copy_(0, layout.prefix_rows, lse_pre.float())
    o, lse = api.merge_partials([o_rest.float(), o_full], [lse_rest, lse_full])
    return o.to(q.dtype), lse
