"""Decode steps of one instance at fixed shapes: padded to batch-size buckets, and on
CUDA captured once per bucket as a CUDA graph and replayed (docs/esp-execution.md).

Why: a decode step launches ~10 kernels per layer for a handful of tokens; at small
batches the GPU waits on the launches, not on memory. A replayed graph launches the
whole step at once. Graphs need fixed shapes and fixed addresses, hence:

* batch bucket B (1, 2, 4, ..., max_batch): a batch of n requests runs as B rows. The
  padding rows take token 0 at position 0, write their K/V into the pool's scratch slot
  (`KVPool(scratch_slots=1)`), see no slots (o = 0) and their hidden states are dropped,
  so real rows compute exactly what an unpadded step computes;
* context bucket C (a power of two >= the longest slot list, at least MIN_CONTEXT): the
  Triton decode kernel's KV split is fixed at capture from C (`slot_attention(max_slots=C)`)
  and it reads the actual slot offsets on the device; slot lists are packed into a
  [B * C] buffer. One graph per (B, C), all sharing one memory pool.

Which steps: decode batches whose every item is mastered, held and stored on this
instance, with tensor parallelism off. Steps that span instances (distributed decode) stay
eager: their per-layer exchanges are host-driven point-to-point transfers, which one graph
cannot hold (a piecewise capture between the exchanges is not done). Batches above
max_batch, slot lists above MAX_CONTEXT and head sizes the Triton decode kernel does not
take (or no Triton) run eagerly too.

On CPU (`capture=False`) the same padded-bucket step runs eagerly, with exact host
layouts; the tests compare it with the unpadded step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.model import CausalLM
from esp_serve.kernels import api as kernels
from esp_serve.kernels.host_layout import HostSeqs
from esp_serve.kernels.triton_common import HEAD_DIMS, usable

MIN_CONTEXT = 512  # smallest context bucket: short lists share one graph
MAX_CONTEXT = 1 << 16  # longest slot list a graph is captured for ([B * C] int64 buffer)


def batch_bucket(n: int, max_batch: int) -> int | None:
    """The smallest power of two >= n, or None above max_batch (n >= 1)."""
    bucket = 1 << max(0, (n - 1).bit_length())
    return bucket if bucket <= max_batch else None


def context_bucket(longest: int) -> int | None:
    """The power of two >= the longest slot list (at least MIN_CONTEXT), None above MAX_CONTEXT."""
    bucket = max(MIN_CONTEXT, 1 << max(0, (longest - 1).bit_length()))
    return bucket if bucket <= MAX_CONTEXT else None


@dataclass
class _Inputs:
    """One padded step's tensors (B rows). For a graph: fixed buffers it was captured on."""

    token_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    new_slots: torch.Tensor  # [B] int64, the scratch slot for padding rows
    slot_ids: torch.Tensor  # [sum of lengths] eager, [B * C] captured
    cu_slots: torch.Tensor  # [B+1] int64
    cu_q: torch.Tensor  # [B+1] int64, one query per row
    host_q: HostSeqs


class DecodeGraphs:
    """Padded-bucket decode of single-instance batches; CUDA graphs when `capture`."""

    def __init__(
        self, model: CausalLM, pool: KVPool, max_batch: int = 64, capture: bool | None = None
    ) -> None:
        if pool.scratch_slots < 1:
            raise ValueError("padded decode needs a KV pool with a scratch slot (scratch_slots=1)")
        self.model, self.pool, self.max_batch = model, pool, max_batch
        self.capture = model.device.type == "cuda" if capture is None else capture
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, _Inputs, torch.Tensor]] = {}
        self._mempool = None  # one graph memory pool shared by every bucket

    def fits(self, batch_size: int, longest: int) -> bool:
        """Whether a batch of this size and longest slot list takes the padded path (when
        capturing: also whether the Triton decode kernel takes this head size)."""
        if batch_bucket(batch_size, self.max_batch) is None:
            return False
        if not self.capture:
            return True
        triton_ok = usable() and self.model.arch.head_dim in HEAD_DIMS
        return triton_ok and context_bucket(longest) is not None

    @torch.inference_mode()  # graph buffers are inference tensors: filled in the same mode
    def hidden(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        new_slots: torch.Tensor,
        slot_lists: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """The decode step of n requests -> hidden [n, H] (what the unpadded step returns).

        new_slots [n] int64: each request's slot for its new token (already allocated);
        slot_lists[i]: every slot request i attends to, the new one included."""
        n = len(token_ids)
        lengths = [s.numel() for s in slot_lists]
        bucket = batch_bucket(n, self.max_batch)
        if bucket is None or not self.fits(n, max(lengths)):
            raise ValueError(f"a decode batch of {n} (longest list {max(lengths)}) does not fit a bucket")
        pad = bucket - n
        if not self.capture:
            inp = self._eager_inputs(token_ids, positions, new_slots, slot_lists, pad)
            host_slots = HostSeqs.from_lengths(lengths + [0] * pad)
            return self._forward(inp, host_slots=host_slots)[:n]
        context = context_bucket(max(lengths))
        assert context is not None  # fits() checked it
        key = (bucket, context)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, context)
        graph, inp, hidden = self._graphs[key]
        self._fill(inp, token_ids, positions, new_slots, slot_lists, pad)
        graph.replay()
        return hidden[:n]

    # ------------------------------------------------------------------ the step
    def _forward(
        self, inp: _Inputs, host_slots: HostSeqs | None = None, max_slots: int | None = None
    ) -> torch.Tensor:
        """The padded step: hidden [B, H]."""
        model, pool = self.model, self.pool

        def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv_layer = pool.kv[layer_idx]  # the scratch slot included
            kernels.write_kv(kv_layer, inp.new_slots, k, v)
            o, _ = kernels.slot_attention(
                q, inp.cu_q, kv_layer, inp.slot_ids, inp.cu_slots, scale=model.scale,
                host_q=inp.host_q, host_slots=host_slots, max_slots=max_slots,
            )  # fmt: skip
            return o

        return model.forward(inp.token_ids, inp.positions, attn)

    def _eager_inputs(self, token_ids, positions, new_slots, slot_lists, pad: int) -> _Inputs:
        dev, rows = self.model.device, len(token_ids) + pad
        lengths = [s.numel() for s in slot_lists] + [0] * pad
        return _Inputs(
            torch.tensor(list(token_ids) + [0] * pad, dtype=torch.int64, device=dev),
            torch.tensor(list(positions) + [0] * pad, dtype=torch.int64, device=dev),
            torch.cat([new_slots.to(dev, torch.int64), self._scratch(pad)]),
            torch.cat([s.to(dev, torch.int64) for s in slot_lists]),
            torch.tensor(_offsets(lengths), dtype=torch.int64, device=dev),
            torch.arange(rows + 1, dtype=torch.int64, device=dev),
            HostSeqs.from_lengths([1] * rows),
        )

    def _scratch(self, count: int) -> torch.Tensor:
        return torch.full((count,), self.pool.scratch_slot, dtype=torch.int64, device=self.model.device)

    # ------------------------------------------------------------------ CUDA graphs
    def _capture(self, bucket: int, context: int) -> tuple[torch.cuda.CUDAGraph, _Inputs, torch.Tensor]:
        """Record the padded step of (bucket, context) on buffers of its own. Warm-up runs
        on a side stream first: Triton autotunes and lazy initialisation happen there,
        never inside the capture."""
        dev = self.model.device
        inp = _Inputs(
            torch.zeros(bucket, dtype=torch.int64, device=dev),
            torch.zeros(bucket, dtype=torch.int64, device=dev),
            self._scratch(bucket),
            torch.zeros(bucket * context, dtype=torch.int64, device=dev),
            torch.zeros(bucket + 1, dtype=torch.int64, device=dev),  # every row empty
            torch.arange(bucket + 1, dtype=torch.int64, device=dev),
            HostSeqs.from_lengths([1] * bucket),
        )
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(inp, max_slots=context)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: in the server, Ray runs control calls (health, status) on other
        # threads of the instance process; under the default "global" mode any CUDA call
        # they make while this thread captures would fail the capture
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            hidden = self._forward(inp, max_slots=context)
        self._mempool = graph.pool()
        return graph, inp, hidden

    def _fill(self, inp: _Inputs, token_ids, positions, new_slots, slot_lists, pad: int) -> None:
        """Copy a step's inputs into a graph's buffers without waiting on the device:
        host ints through pinned memory, slot lists device to device."""
        lengths = [s.numel() for s in slot_lists] + [0] * pad
        inp.token_ids.copy_(_pinned(list(token_ids) + [0] * pad), non_blocking=True)
        inp.positions.copy_(_pinned(list(positions) + [0] * pad), non_blocking=True)
        inp.cu_slots.copy_(_pinned(_offsets(lengths)), non_blocking=True)
        inp.new_slots[: len(token_ids)].copy_(new_slots)
        inp.new_slots[len(token_ids) :].fill_(self.pool.scratch_slot)
        total = sum(lengths)
        torch.cat(list(slot_lists), out=inp.slot_ids[:total])


def _offsets(lengths: Sequence[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _pinned(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).pin_memory()
