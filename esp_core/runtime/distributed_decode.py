"""Multi-master decode attention (architecture.md §3.3) and its general form, remote partial
attention, also used by chunked prefill to attend to a request's cached KV (architecture.md §4).

Remote partial attention, per layer:
1. every owner of queries (a decode master, or a ring rank holding chunk queries) sends
   them to each instance holding KV of their request: one message per peer, all requests
   packed (`[n, Hq, D]`);
2. every holder computes partial attention `(o, lse)` of the queries it received over its
   local slots of each request and sends them back (one `[n, Hq, D + 1]` fp32 message per
   peer, lse in the last column);
3. the owner computes its own local partial while the remote partials are in flight, then
   merges all partials by the LSE rule (`merge_partials`, exact with empty partials).

Message sizes follow from the plan (query counts and holder sets are known to every
instance of the batch), so no sizes travel. Every instance of the batch calls `layer` once
per model layer in the same order, also when it owns no queries (it then only serves).

Decode adds two things (`DecodeAttention`): the new token attends to its own K/V through a
one-key "self partial" computed on the master (so it counts exactly once wherever its K/V
ends up, and holders only see KV from before this step), and after the last layer the new
K/V of every layer is stored on `new_kv_instance` (`store_new_kv`), which may be an
instance outside the holders: that is scale-up, with no KV moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from esp_core.runtime.comm import P2PComm
from esp_serve.kernels.api import merge_partials, slot_attention
from esp_serve.kernels.cascade import CascadeLayout, cascade_slot_attention
from esp_serve.kernels.host_layout import HostSeqs


@dataclass(frozen=True)
class QueryGroup:
    """Queries of one request owned by one instance, to attend to KV on `holders`."""

    request_id: str
    owner: int
    num_queries: int
    holders: tuple[int, ...]


def _cu(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    out = torch.zeros(len(counts) + 1, dtype=torch.int64)
    if counts:
        out[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return out.to(device)


def _gather_slots(
    groups: Sequence[QueryGroup], local_slots: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, HostSeqs]:
    """Concatenated local slot ids of each group's request, their offsets [B+1] and the
    offsets' host copy."""
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    parts = [local_slots.get(g.request_id, empty).to(device=device, dtype=torch.int64) for g in groups]
    slots = torch.cat(parts) if parts else empty
    counts = [p.numel() for p in parts]
    return slots, _cu(counts, device), HostSeqs.from_lengths(counts)


def _layout(
    cascade: Callable[[list[str], list[int]], CascadeLayout | None] | None, groups: Sequence[QueryGroup]
) -> CascadeLayout | None:
    if cascade is None or len(groups) < 2:
        return None
    return cascade([g.request_id for g in groups], [g.num_queries for g in groups])


class RemotePartialAttention:
    """Per-batch exchange plan; `layer(kv_layer, q)` runs one layer of it.

    `groups` is the batch's full list, identical on every instance (its order fixes the
    packing order of every message). `q` given to `layer` holds this instance's owned
    queries: the groups with `owner == me`, in list order, `num_queries` rows each.
    `local_slots[request_id]` lists the slots of this instance's pool that queries of that
    request see (empty or absent: none); it is fixed for the batch, so KV written during the
    batch (the chunk's own KV, a new decode token) is not seen twice.
    """

    def __init__(
        self,
        comm: P2PComm,
        groups: Sequence[QueryGroup],
        num_q_heads: int,
        head_dim: int,
        local_slots: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
        scale: float | None = None,
        tag: int = 21,
        cascade: Callable[[list[str], list[int]], CascadeLayout | None] | None = None,
    ) -> None:
        """`cascade(request_ids, query_counts)`: the shared-prefix layout of those
        requests' local slots (`local_exec.shared_prefix_layout`), or None; given, each
        local partial reads a prefix its requests share once (kernels/cascade.py)."""
        self.comm = comm
        self.me = me = comm.instance
        self.groups = tuple(groups)
        self.num_q_heads, self.head_dim = num_q_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.tag = tag
        self.device = device = torch.device(device)

        # Rows of my q: owned groups, in list order.
        own = [g for g in self.groups if g.owner == me]
        starts = [0]
        for g in own:
            starts.append(starts[-1] + g.num_queries)
        self.num_own_queries = starts[-1]

        def rows_of(select: Callable[[QueryGroup], bool]) -> torch.Tensor:
            idx = [torch.arange(starts[i], starts[i + 1]) for i, g in enumerate(own) if select(g)]
            return (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).to(device)

        # Outgoing queries per peer (and the rows their partials come back to).
        self.peers_out: list[int] = sorted({h for g in own for h in g.holders if h != me})
        self.rows_out = {p: rows_of(lambda g, p=p: p in g.holders) for p in self.peers_out}
        # My own local partial covers the owned groups I also hold KV of.
        self.own_rows = rows_of(lambda g: me in g.holders)
        own_held = [g for g in own if me in g.holders]
        self.own_cu_q = _cu([g.num_queries for g in own_held], device)
        self.own_host_q = HostSeqs.from_lengths([g.num_queries for g in own_held])
        self.own_slots, self.own_cu_slots, self.own_host_slots = _gather_slots(own_held, local_slots, device)
        self.own_cascade = _layout(cascade, own_held)

        # Incoming queries: groups of other owners that name me as a holder, grouped by
        # owner; one receive buffer for all of them so one slot_attention call serves all.
        served = [g for g in self.groups if g.owner != me and me in g.holders]
        self.peers_in: list[int] = sorted({g.owner for g in served})
        served = [g for p in self.peers_in for g in served if g.owner == p]
        self.in_counts = {p: sum(g.num_queries for g in served if g.owner == p) for p in self.peers_in}
        self.num_served_queries = sum(self.in_counts.values())
        self.served_cu_q = _cu([g.num_queries for g in served], device)
        self.served_host_q = HostSeqs.from_lengths([g.num_queries for g in served])
        self.served_slots, self.served_cu_slots, self.served_host_slots = _gather_slots(
            served, local_slots, device
        )
        self.served_cascade = _layout(cascade, served)

    # ---------------------------------------------------------------------------------
    def layer(self, kv_layer: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_layer [slots, 2, Hkv, D] (this instance's pool, one layer); q [n_own, Hq, D]
        -> (o [n_own, Hq, D] fp32, lse [n_own, Hq] fp32) over all holders' KV."""
        Hq, D = self.num_q_heads, self.head_dim
        assert q.shape[0] == self.num_own_queries, (q.shape, self.num_own_queries)
        # 1. queries out / in
        q_in = torch.empty(self.num_served_queries, Hq, D, dtype=q.dtype, device=q.device)
        recv_q, off = [], 0
        for p in self.peers_in:
            recv_q.append((p, q_in[off : off + self.in_counts[p]]))
            off += self.in_counts[p]
        send_q = [(p, q.index_select(0, self.rows_out[p])) for p in self.peers_out]
        self.comm.exchange(send_q, recv_q, self.tag)

        # 2. serve the peers' queries first, so their partials travel while I compute mine
        part_out = torch.empty(self.num_served_queries, Hq, D + 1, dtype=torch.float32, device=q.device)
        if self.num_served_queries and self.served_cascade is not None:
            o_s, lse_s = cascade_slot_attention(
                q_in, self.served_cu_q, kv_layer, self.served_cascade, self.scale, host_q=self.served_host_q
            )
            part_out[..., :D] = o_s
            part_out[..., D] = lse_s
        elif self.num_served_queries:
            o_s, lse_s = slot_attention(
                q_in,
                self.served_cu_q,
                kv_layer,
                self.served_slots,
                self.served_cu_slots,
                scale=self.scale,
                host_q=self.served_host_q,
                host_slots=self.served_host_slots,
            )
            part_out[..., :D] = o_s
            part_out[..., D] = lse_s
        send_p, off = [], 0
        for p in self.peers_in:
            send_p.append((p, part_out[off : off + self.in_counts[p]]))
            off += self.in_counts[p]
        part_in = {
            p: torch.empty(self.rows_out[p].numel(), Hq, D + 1, dtype=torch.float32, device=q.device)
            for p in self.peers_out
        }
        pending = self.comm.start(send_p, list(part_in.items()), self.tag + 1)

        # 3. my own partial, overlapped with the partials in flight
        n = self.num_own_queries
        outs, lses = [], []
        if self.own_rows.numel() and self.own_cascade is not None:
            o_m, lse_m = cascade_slot_attention(
                q.index_select(0, self.own_rows),
                self.own_cu_q,
                kv_layer,
                self.own_cascade,
                self.scale,
                host_q=self.own_host_q,
            )
            outs.append(self._scatter(o_m.float(), self.own_rows, n, (Hq, D), 0.0))
            lses.append(self._scatter(lse_m, self.own_rows, n, (Hq,), float("-inf")))
        elif self.own_rows.numel():
            o_m, lse_m = slot_attention(
                q.index_select(0, self.own_rows),
                self.own_cu_q,
                kv_layer,
                self.own_slots,
                self.own_cu_slots,
                scale=self.scale,
                host_q=self.own_host_q,
                host_slots=self.own_host_slots,
            )
            outs.append(self._scatter(o_m.float(), self.own_rows, n, (Hq, D), 0.0))
            lses.append(self._scatter(lse_m, self.own_rows, n, (Hq,), float("-inf")))
        pending.wait()
        for p in self.peers_out:
            rows = self.rows_out[p]
            outs.append(self._scatter(part_in[p][..., :D], rows, n, (Hq, D), 0.0))
            lses.append(self._scatter(part_in[p][..., D], rows, n, (Hq,), float("-inf")))
        if not outs:  # no holder at all (e.g. a request with no cached KV)
            return (
                torch.zeros(n, Hq, D, dtype=torch.float32, device=q.device),
                torch.full((n, Hq), float("-inf"), dtype=torch.float32, device=q.device),
            )
        if len(outs) == 1:
            return outs[0], lses[0]
        return merge_partials(outs, lses)

    def _scatter(
        self, values: torch.Tensor, rows: torch.Tensor, n: int, tail: tuple[int, ...], fill: float
    ) -> torch.Tensor:
        """Place per-row partials at their rows of the owner's q; absent rows get `fill`
        (o = 0, lse = -inf: an empty partial that contributes nothing to the merge)."""
        if rows.numel() == n:
            return values  # rows are 0..n-1 in order
        out = torch.full((n, *tail), fill, dtype=torch.float32, device=values.device)
        return out.index_copy_(0, rows, values)


def self_partial(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of each query over its own single key: q [n, Hq, D], k/v
    [n, Hkv, D] -> (o = v expanded to Hq, lse = q.k * scale), fp32."""
    group = q.shape[1] // k.shape[1]
    k_e = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    v_e = v.float().repeat_interleave(group, dim=1) if group > 1 else v.float()
    lse = (q.float() * k_e).sum(-1) * scale  # [n, Hq]
    return v_e, lse


@dataclass(frozen=True)
class DecodeSlot:
    """One decode item as the exchange needs it (built from a plan's DecodeItem)."""

    request_id: str
    position: int
    master: int
    holders: tuple[int, ...]
    new_kv_instance: int


class DecodeAttention:
    """One decode step's attention across the batch's instances.

    Use `attend(layer_idx, q, k, v)` as the model's attention callable on masters (rows
    = mastered items in batch order), `serve(layer_idx)` on an instance mastering nothing,
    then `store_new_kv(...)` once after the last layer on every instance of the batch.
    """

    def __init__(
        self,
        comm: P2PComm,
        items: Sequence[DecodeSlot],
        kv_cache: torch.Tensor,
        num_q_heads: int,
        local_slots: Mapping[str, torch.Tensor],
        scale: float | None = None,
        tag: int = 31,
        cascade: Callable[[list[str], list[int]], CascadeLayout | None] | None = None,
    ) -> None:
        self.comm = comm
        self.items = tuple(items)
        self.kv_cache = kv_cache  # [layers, slots, 2, Hkv, D]
        head_dim = kv_cache.shape[-1]
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        groups = [QueryGroup(it.request_id, it.master, 1, it.holders) for it in self.items]
        self.exchange = RemotePartialAttention(
            comm, groups, num_q_heads, head_dim, local_slots, kv_cache.device, self.scale, tag, cascade
        )
        self.mastered = [it for it in self.items if it.master == comm.instance]
        num_layers = kv_cache.shape[0]
        # new K/V of mastered items per layer: [layers, n_own, 2, Hkv, D]
        self.new_kv = torch.empty(
            num_layers, len(self.mastered), *kv_cache.shape[2:], dtype=kv_cache.dtype, device=kv_cache.device
        )
        self.tag = tag

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """q [n_own, Hq, D], k/v [n_own, Hkv, D] of the new tokens -> o [n_own, Hq, D]."""
        self.new_kv[layer_idx, :, 0] = k
        self.new_kv[layer_idx, :, 1] = v
        o_h, lse_h = self.exchange.layer(self.kv_cache[layer_idx], q)
        if not self.mastered:
            return o_h.to(q.dtype)
        o_s, lse_s = self_partial(q, k, v, self.scale)
        o, _ = merge_partials([o_h, o_s], [lse_h, lse_s])
        return o.to(q.dtype)

    def serve(self, layer_idx: int) -> None:
        """The layer's exchange on an instance that masters no item of the batch."""
        H, D = self.exchange.num_q_heads, self.exchange.head_dim
        q = torch.empty(0, H, D, dtype=self.kv_cache.dtype, device=self.kv_cache.device)
        self.exchange.layer(self.kv_cache[layer_idx], q)

    def store_new_kv(self, allocate: Callable[[str, int], int]) -> None:
        """Store every new token's K/V (all layers) on its `new_kv_instance`.

        `allocate(request_id, position) -> slot` reserves a slot in this instance's pool.
        One message per (master, destination) pair, sizes known from the plan.
        """
        me = self.comm.instance
        sends = []
        for dst in sorted({it.new_kv_instance for it in self.mastered}):
            rows = [i for i, it in enumerate(self.mastered) if it.new_kv_instance == dst]
            block = self.new_kv[:, rows].contiguous()  # [layers, n, 2, Hkv, D]
            if dst == me:
                self._write(block, [self.mastered[i] for i in rows], allocate)
            else:
                sends.append((dst, block))
        incoming = {}
        for src in sorted({it.master for it in self.items if it.new_kv_instance == me} - {me}):
            its = [it for it in self.items if it.master == src and it.new_kv_instance == me]
            incoming[src] = (
                its,
                torch.empty(
                    self.new_kv.shape[0],
                    len(its),
                    *self.new_kv.shape[2:],
                    dtype=self.new_kv.dtype,
                    device=self.new_kv.device,
                ),
            )
        self.comm.exchange(sends, [(s, buf) for s, (_, buf) in incoming.items()], self.tag + 2)
        for its, buf in incoming.values():
            self._write(buf, its, allocate)

    def _write(
        self, block: torch.Tensor, items: Sequence[DecodeSlot], allocate: Callable[[str, int], int]
    ) -> None:
        slots = torch.tensor(
            [allocate(it.request_id, it.position) for it in items],
            dtype=torch.int64,
            device=self.kv_cache.device,
        )
        self.kv_cache[:, slots] = block  # [layers, n, 2, Hkv, D]
