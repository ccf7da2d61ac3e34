"""Striped ring attention for one layer of a varlen prefill batch (architecture.md §3.1), and the
scale-down hook that keeps passing K/V blocks (architecture.md §3.2).

Striping: token g of a request chunk lives on logical rank `(g + offset) % P`. Every rank
can compute every other rank's token layout from the plan alone, so K/V blocks travel
without metadata: a block is just `[n, 2, Hkv, D]`.

Ring: at step t rank r holds the K/V block of rank (r - t) mod P. It first starts sending
that block to r+1 and receiving the next one from r-1 into the other buffer (double
buffering), then computes its queries against the block it holds with the causal mask on
*global* positions, merged into the running (o, lse) by the LSE rule in the same call
(`attention_accumulate`), then waits for the transfer. After P steps every query has seen
every key of its request.

The scale-down hook (`KeepWriter`) sees each block once per layer (including the rank's
own block at step 0) and copies the rows this rank must keep into its KV pool, so the KV
ends up on the decode set with no extra traffic.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from esp_core.runtime.comm import P2PComm
from esp_serve.kernels.api import attention_accumulate, write_kv
from esp_serve.kernels.host_layout import HostSeqs


@dataclass(frozen=True)
class StripedChunk:
    """One request's share of a ring: global positions [start, end), striped by offset."""

    start: int
    end: int
    offset: int

    def __len__(self) -> int:
        return self.end - self.start


def striped_range(chunk: StripedChunk, num_ranks: int, rank: int) -> range:
    """Global positions of `chunk` on logical `rank`, ascending: g with (g + offset) % P == rank."""
    first = chunk.start + (rank - chunk.offset - chunk.start) % num_ranks
    # a chunk shorter than the ring leaves some ranks with no token of it
    return range(min(first, chunk.end), chunk.end, num_ranks)


def striped_positions(chunk: StripedChunk, num_ranks: int, rank: int) -> torch.Tensor:
    """`striped_range` as an int64 tensor."""
    return torch.tensor(striped_range(chunk, num_ranks, rank), dtype=torch.int64)


@dataclass(frozen=True)
class BlockIndex:
    """A block's layout as host ints: what the host decides from (which requests a tile
    touches, whether the causal mask hides it, which rows a rank keeps), so no step reads
    offsets or positions back from the device."""

    cu_seqlens: list[int]
    positions: list[int]
    stride: int | None = None  # each request's positions advance by this (a ring's size)

    def tile(self, a: int, b: int) -> HostSeqs:
        """Host layout of rows [a, b): offsets clamped to the tile and, with a known
        stride, each request's first position there (any value for requests it misses)."""
        cu = [min(max(c, a), b) - a for c in self.cu_seqlens]
        if self.stride is None:
            return HostSeqs.of(cu)
        first = [self.positions[a + c] if c < b - a else 0 for c in cu[:-1]]
        return HostSeqs.of(cu, first, self.stride)


@dataclass(frozen=True)
class RankBlock:
    """The tokens one logical rank holds: request after request, ascending positions."""

    positions: torch.Tensor  # [n] int64, global positions
    cu_seqlens: torch.Tensor  # [B+1] int64, offsets of each request's tokens
    index: BlockIndex  # the same, as host ints

    @property
    def num_tokens(self) -> int:
        return len(self.index.positions)

    def counts(self) -> list[int]:
        cu = self.index.cu_seqlens
        return [b - a for a, b in zip(cu, cu[1:])]


def ring_blocks(chunks: Sequence[StripedChunk], num_ranks: int) -> list[RankBlock]:
    """The layout of every logical rank of a ring (identical on every rank)."""
    blocks = []
    for rank in range(num_ranks):
        positions: list[int] = []
        cu = [0]
        for c in chunks:
            positions.extend(striped_range(c, num_ranks, rank))
            cu.append(len(positions))
        index = BlockIndex(cu, positions, num_ranks)
        blocks.append(RankBlock(torch.tensor(positions, dtype=torch.int64), torch.tensor(cu), index))
    return blocks


def empty_accumulator(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o = 0 [Tq, Hq, D] fp32, lse = -inf [Tq, Hq]): the running result before any block."""
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return o, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)


def tiled_attention(
    o_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    q_index: BlockIndex,
    k_index: BlockIndex,
    scale: float | None,
    tile_q: int,
    tile_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal varlen attention of q against one K/V block, merged in place into the
    running (o_acc fp32, lse_acc) (`empty_accumulator` before the first block), computed
    tile by tile so memory stays O(tile_q * tile_k * heads) whatever the block size, and
    skipping tiles the causal mask hides completely. `q_index` / `k_index` are the host
    copies of the query and key layouts.

    Each tile is one `attention_accumulate`: the Triton backend merges the tile into the
    accumulator in its epilogue, the others compute the tile and merge it after.

    Why tiles: a ring step at 128K+ tokens would otherwise materialise the whole score
    matrix of the block; the kernels may do their own tiling, in which case large tiles
    (one per block) make this a single call.
    """
    nq, nk = q.shape[0], k.shape[0]
    cq, ck = q_index.cu_seqlens, k_index.cu_seqlens
    qp, kp = q_index.positions, k_index.positions
    for qa in range(0, nq, tile_q):
        qb = min(nq, qa + tile_q)
        cu_qt = cu_q.clamp(qa, qb) - qa
        # requests with queries in this tile: i0 .. i1-1 (bisect keeps this O(live tiles)
        # for batches of many short requests); their keys span [ck[i0], ck[i1])
        i0, i1 = bisect.bisect_right(cq, qa) - 1, bisect.bisect_left(cq, qb)
        for ka in range(ck[i0] - ck[i0] % tile_k, ck[i1], tile_k):
            kb = min(nk, ka + tile_k)
            # Skip the tile unless some request has queries and visible keys in it (under
            # striping a request's positions ascend within a block, so min/max suffice).
            j0, j1 = bisect.bisect_right(ck, ka) - 1, bisect.bisect_left(ck, kb)
            live = False
            for i in range(max(i0, j0), min(i1, j1)):
                q0, q1 = max(cq[i], qa), min(cq[i + 1], qb)
                k0, k1 = max(ck[i], ka), min(ck[i + 1], kb)
                if q0 < q1 and k0 < k1 and qp[q1 - 1] >= kp[k0]:
                    live = True
                    break
            if not live:
                continue
            cu_kt = cu_k.clamp(ka, kb) - ka
            attention_accumulate(
                o_acc[qa:qb],  # row slices of the accumulator: merged in place
                lse_acc[qa:qb],
                q[qa:qb],
                k[ka:kb],
                v[ka:kb],
                q_pos[qa:qb],
                k_pos[ka:kb],
                cu_qt,
                cu_kt,
                scale=scale,
                causal=True,
                host_q=q_index.tile(qa, qb),
                host_k=k_index.tile(ka, kb),
            )
    return o_acc, lse_acc


# Tile edge (tokens) of a ring step's attention on CPU: memory per tile is tile^2 * heads
# * 4 B (x ~3 temporaries in the torch reference); 512 keeps score tiles cache-resident
# (measured ~1.6-1.9x faster than 1024-2048 on the 2-core CI VM) and wastes little work on
# the causal diagonal. On GPU the attention kernels tile internally, so a ring step is one
# call per block there. Settable per process (benchmarks), never per request.
DEFAULT_TILE = 512
WHOLE_BLOCK = 1 << 62

# Called with (layer_idx, source logical rank, kv block [n, 2, Hkv, D]) for every block.
BlockHook = Callable[[int, int, torch.Tensor], None]


class KeepWriter:
    """Scale-down: copy the positions this rank keeps out of every passing K/V block.

    `slot_of[i]` is `[len(chunks[i])]` int64: the pool slot of position `start + j` of
    request i on this rank, or -1 where this rank keeps nothing. Slots are allocated by
    the caller before the layers run; this only writes. The row/slot indices per source
    rank are computed once per batch, not per layer.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        blocks: Sequence[RankBlock],
        chunks: Sequence[StripedChunk],
        slot_of: Sequence[torch.Tensor],
    ) -> None:
        self.kv_cache = kv_cache  # [layers, slots, 2, Hkv, D]
        self._rows: list[torch.Tensor] = []
        self._slots: list[torch.Tensor] = []
        for block in blocks:
            rows, slots = [], []
            cu = block.index.cu_seqlens
            for i, chunk in enumerate(chunks):
                pos = block.positions[cu[i] : cu[i + 1]]
                s = slot_of[i].to(torch.int64)[pos - chunk.start] if pos.numel() else pos
                keep = s >= 0
                rows.append(torch.nonzero(keep).flatten() + cu[i])
                slots.append(s[keep])
            self._rows.append(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64))
            self._slots.append(torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64))
        device = kv_cache.device
        self._rows = [r.to(device) for r in self._rows]
        self._slots = [s.to(device) for s in self._slots]

    @property
    def num_kept(self) -> int:
        return sum(int(s.numel()) for s in self._slots)

    def __call__(self, layer_idx: int, src_rank: int, kv_block: torch.Tensor) -> None:
        rows = self._rows[src_rank]
        if rows.numel():
            kept = kv_block.index_select(0, rows)  # [kept, 2, Hkv, D]
            write_kv(self.kv_cache[layer_idx], self._slots[src_rank], kept[:, 0], kept[:, 1])


class RingAttention:
    """Striped ring attention of one batch; call `layer(...)` once per model layer.

    Built once per batch (layouts and buffers are reused by every layer). `ring` is the
    ordered instance list; this instance's logical rank is its index there.
    """

    def __init__(
        self,
        comm: P2PComm,
        ring: Sequence[int],
        chunks: Sequence[StripedChunk],
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        scale: float | None = None,
        on_block: BlockHook | None = None,
        tag: int = 11,
        tile_q: int | None = None,
        tile_k: int | None = None,
    ) -> None:
        self.comm = comm
        self.ring = tuple(ring)
        self.num_ranks = len(self.ring)
        self.rank = self.ring.index(comm.instance)
        self.chunks = tuple(chunks)
        self.blocks = ring_blocks(self.chunks, self.num_ranks)
        self.scale = scale
        self.on_block = on_block
        self.tag = tag
        device = torch.device(device)
        default_tile = DEFAULT_TILE if device.type == "cpu" else WHOLE_BLOCK
        self.tile_q = tile_q or default_tile
        self.tile_k = tile_k or default_tile
        # Positions and offsets live on the compute device; the mask is built from them.
        self._pos = [b.positions.to(device) for b in self.blocks]
        self._cu = [b.cu_seqlens.to(device) for b in self.blocks]
        self._row = 2 * num_kv_heads * head_dim
        self._kv_shape = (2, num_kv_heads, head_dim)
        largest = max(b.num_tokens for b in self.blocks)
        # Two flat receive buffers: the block being computed on and the one in flight.
        self._buffers = [
            torch.empty(largest * self._row, dtype=dtype, device=device)
            for _ in range(2 if self.num_ranks > 1 else 0)
        ]

    @property
    def local(self) -> RankBlock:
        """This rank's tokens (the caller's q/k/v rows must follow this order)."""
        return self.blocks[self.rank]

    def _view(self, which: int, src_rank: int) -> torch.Tensor:
        n = self.blocks[src_rank].num_tokens
        return self._buffers[which][: n * self._row].view(n, *self._kv_shape)

    def layer(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, Hq, D], k/v [n, Hkv, D] of this rank's tokens (RoPE applied) ->
        (o [n, Hq, D] dtype of q, lse [n, Hq] fp32) over all keys of each request."""
        P, r = self.num_ranks, self.rank
        q_pos, cu_q = self._pos[r], self._cu[r]
        current = torch.stack([k, v], dim=1).contiguous()  # [n, 2, Hkv, D]
        o, lse = empty_accumulator(q)
        for step in range(P):
            src = (r - step) % P
            pending = None
            if step < P - 1:  # start moving the next block before computing on this one
                nxt = self._view(step % 2, (r - step - 1) % P)
                pending = self.comm.ring_shift(self.ring, current, nxt, self.tag)
            if self.on_block is not None:
                self.on_block(layer_idx, src, current)
            # online softmax across steps: each block's partial merged by LSE
            tiled_attention(
                o,
                lse,
                q,
                current[:, 0],
                current[:, 1],
                q_pos,
                self._pos[src],
                cu_q,
                self._cu[src],
                self.blocks[r].index,
                self.blocks[src].index,
                self.scale,
                self.tile_q,
                self.tile_k,
            )
            if pending is not None:
                pending.wait()
                current = nxt
        return o.to(q.dtype), lse
