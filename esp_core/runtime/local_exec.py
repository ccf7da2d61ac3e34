"""Execution of single-instance batches: varlen prefill (with chunks) and batched decode.

These functions are the building blocks the ESP executor reuses: they take the model,
this instance's KV pool and request states explicitly, and keep the per-layer attention
in small closures so the distributed versions can swap just that part.

Prefill of a batch on one instance, per layer (T = all tokens of all items):
    write the kept tokens' K/V into their slots;
    (o, lse)   = varlen_attention over the batch's own tokens (causal on global positions)
    (o2, lse2) = slot_attention over each item's cached slots (chunked prefill), if any
    o = merge_partials  -- exact LSE merge; items without cached KV get lse2 = -inf.
Decode, per layer: write the new token's K/V into its slot, then slot_attention over all
of the request's slots (the new token included, so it attends to itself exactly once).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esp_core.runtime.decode_graph import DecodeGraphs
from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.model import CausalLM, check_step_inputs
from esp_core.runtime.request_state import RequestState
from esp_core.runtime.sampling import SampleRow, sample
from esp_core.sched.plan import DecodeBatch, DecodeItem, PrefillBatch, PrefillItem, SampledToken
from esp_serve.kernels import api as kernels
from esp_serve.kernels.cascade import CascadeLayout, cascade_slot_attention
from esp_serve.kernels.host_layout import HostSeqs


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    """Offsets [B+1] int64 from lengths [B]."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out.to(device)


def kept_positions(item: PrefillItem, instance: int) -> list[int]:
    """Positions of this chunk that `instance` must store (its KVKeep ranges, clipped)."""
    out: list[int] = []
    for keep in item.keep:
        if keep.instance != instance:
            continue
        for r in keep.ranges:
            part = r.intersect(item.tokens)
            if part is not None:
                out.extend(range(part.start, part.end))
    return out


def chunk_token_ids(state: RequestState, item: PrefillItem) -> list[int]:
    """Token ids of the chunk's positions; records `extra_token_ids` (outputs) first."""
    if item.extra_token_ids:
        first_extra = max(item.tokens.start, state.prompt_len)
        if len(item.extra_token_ids) != item.tokens.end - first_extra:
            raise ValueError(
                f"request {item.request_id!r}: {len(item.extra_token_ids)} "
                f"extra_token_ids for positions [{first_extra}, {item.tokens.end})"
            )
        state.record_outputs_from(first_extra, item.extra_token_ids)
    return state.token_ids(item.tokens.start, item.tokens.end)


@dataclass
class PrefillInputs:
    """Flattened inputs of a prefill batch on one instance (items in batch order)."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, global
    cu_seqlens: torch.Tensor  # [B+1]
    lengths: list[int]
    host: HostSeqs  # cu_seqlens and each item's positions (start, step 1) as host ints


def build_prefill_inputs(
    states: dict[str, RequestState], batch: PrefillBatch, model: CausalLM
) -> PrefillInputs:
    """The batch's tensors, built from host lists once every item's inputs are checked."""
    ids: list[int] = []
    pos: list[int] = []
    lengths = []
    device = model.device
    starts = [item.tokens.start for item in batch.items]
    for item in batch.items:
        state = _state(states, item.request_id)
        chunk = chunk_token_ids(state, item)
        check_step_inputs(model.arch, item.request_id, chunk, item.tokens.end)
        ids.extend(chunk)
        pos.extend(range(item.tokens.start, item.tokens.end))
        lengths.append(len(item.tokens))
    return PrefillInputs(
        torch.tensor(ids, dtype=torch.int64, device=device),
        torch.tensor(pos, dtype=torch.int64, device=device),
        _cu(lengths, device),
        lengths,
        HostSeqs.from_lengths(lengths, starts, step=1),
    )


def prefill_sample_row(state: RequestState, item: PrefillItem) -> SampleRow:
    """The sampling row of a prefill item that samples (output index = chunk end - prompt)."""
    out_index = item.tokens.end - state.prompt_len
    if out_index < 0:
        raise ValueError(
            f"request {item.request_id!r}: sample=True but the chunk ends at "
            f"{item.tokens.end}, inside the prompt ({state.prompt_len} tokens)"
        )
    prompt, outputs = state.history(out_index)
    return SampleRow(item.request_id, state.sampling, prompt, outputs, out_index)


def record_decode_inputs(states: dict[str, RequestState], items: Sequence[DecodeItem]) -> None:
    """Every instance of a decode batch records each item's output_prefix and input_token,
    so whichever instance masters the next step has the full history."""
    for item in items:
        state = _state(states, item.request_id)
        if item.output_prefix:
            state.record_outputs_from(state.prompt_len, item.output_prefix)
        state.record_token(item.position, input_of(item))


def input_of(item: DecodeItem) -> int:
    """The item's input token (a look-ahead item is resolved by `resolve_lookahead` first)."""
    if item.input_token is None:
        raise ValueError(
            f"request {item.request_id!r}: decode item at position {item.position} without "
            "input token outside a one-instance look-ahead step"
        )
    return item.input_token


def resolve_lookahead(states: dict[str, RequestState], items: Sequence[DecodeItem]) -> list[DecodeItem]:
    """Look-ahead items (input_token=None) with the token this instance sampled for their
    position (it mastered the previous one-instance step); other items unchanged."""
    return [
        it
        if it.input_token is not None
        else dataclasses.replace(it, input_token=_state(states, it.request_id).sampled_input(it.position))
        for it in items
    ]


def decode_sample_row(state: RequestState, item: DecodeItem) -> SampleRow:
    """The sampling row of a decode item (after `record_decode_inputs`)."""
    out_index = item.position + 1 - state.prompt_len
    prompt, outputs = state.history(out_index)
    return SampleRow(item.request_id, state.sampling, prompt, outputs, out_index)


def undo_allocations(pool: KVPool, allocated: list[tuple[str, list[int]]]) -> None:
    """Free slots allocated by a batch that failed before completing."""
    for request_id, positions in allocated:
        pool.free_positions(request_id, positions)


def _state(states: dict[str, RequestState], request_id: str) -> RequestState:
    try:
        return states[request_id]
    except KeyError:
        raise KeyError(
            f"unknown request {request_id!r}: its NewRequest never reached this "
            "instance (or it was released as finished/aborted)"
        ) from None


def prefill_local(
    model: CausalLM, pool: KVPool, states: dict[str, RequestState], batch: PrefillBatch, rank: int
) -> list[SampledToken]:
    """Run a prefill batch entirely on this instance; returns the sampled first tokens."""
    device = model.device
    inp = build_prefill_inputs(states, batch, model)
    # Validated before any slot is taken, so a bad item cannot leak slots.
    rows = [prefill_sample_row(states[it.request_id], it) for it in batch.items if it.sample]
    last_rows = list(itertools.accumulate(inp.lengths, initial=-1))[1:]  # each item's last row
    sample_rows_idx = [last_rows[b] for b, it in enumerate(batch.items) if it.sample]

    # Cached KV of chunked items, captured before this batch allocates its own slots.
    cached: list[torch.Tensor] = []
    for item in batch.items:
        if item.tokens.start > 0:
            holders = item.cached_holders or (rank,)
            if any(h != rank for h in holders):
                raise NotImplementedError(
                    f"request {item.request_id!r}: cached KV on instances {holders} needs ESP "
                    "execution (only this instance's own cache is read locally)"
                )
            cached.append(pool.slots_of(item.request_id))
        else:
            cached.append(torch.empty(0, dtype=torch.int64, device=device))
    any_cached = any(c.numel() for c in cached)
    cached_ids = torch.cat(cached) if any_cached else None
    cu_cached = _cu([c.numel() for c in cached], device)
    host_cached = HostSeqs.from_lengths([c.numel() for c in cached])

    # Slots for the tokens this instance keeps, and where those tokens sit in the batch.
    keep_rows: list[int] = []
    new_slots: list[torch.Tensor] = []
    allocated: list[tuple[str, list[int]]] = []
    offset = 0
    try:
        for item in batch.items:
            keep = kept_positions(item, rank)
            if keep:
                new_slots.append(pool.allocate(item.request_id, keep))
                allocated.append((item.request_id, keep))
                keep_rows.extend(offset + p - item.tokens.start for p in keep)
            offset += len(item.tokens)
    except BaseException:
        undo_allocations(pool, allocated)
        raise
    slot_ids = torch.cat(new_slots) if new_slots else None
    keep_idx = torch.tensor(keep_rows, dtype=torch.int64, device=device)

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv_layer = pool.layer(layer_idx)
        if slot_ids is not None:
            kernels.write_kv(kv_layer, slot_ids, k.index_select(0, keep_idx), v.index_select(0, keep_idx))
        o, lse = kernels.varlen_attention(
            q, k, v, inp.positions, inp.positions, inp.cu_seqlens, inp.cu_seqlens,
            scale=model.scale, host_q=inp.host, host_k=inp.host,
        )  # fmt: skip
        if any_cached:
            o2, lse2 = kernels.slot_attention(
                q, inp.cu_seqlens, kv_layer, cached_ids, cu_cached,
                scale=model.scale, host_q=inp.host, host_slots=host_cached,
            )  # fmt: skip
            o, _ = kernels.merge_partials([o, o2], [lse, lse2])
        return o

    try:
        hidden = model.forward(inp.token_ids, inp.positions, attn)  # [T, H]
    except BaseException:
        undo_allocations(pool, allocated)  # do not leak the slots of a failed batch
        raise

    if not rows:
        return []
    logits = model.compute_logits(hidden[sample_rows_idx])  # [n, V] fp32
    return sample(logits, rows, model.arch.eos_token_ids)


def decode_local(
    model: CausalLM,
    pool: KVPool,
    states: dict[str, RequestState],
    batch: DecodeBatch,
    rank: int,
    graphs: DecodeGraphs | None = None,
) -> list[SampledToken]:
    """One decode step of every item on this instance (master, holder and KV home);
    through `graphs` (padded buckets, CUDA graphs) when given and the batch fits."""
    for item in batch.items:
        if item.master != rank or item.new_kv_instance != rank or any(h != rank for h in item.holders):
            raise NotImplementedError(
                f"request {item.request_id!r}: master {item.master}, holders {item.holders}, "
                f"new KV on {item.new_kv_instance} needs ESP execution (this is instance {rank})"
            )
    items = resolve_lookahead(states, batch.items)
    for it in items:
        check_step_inputs(model.arch, it.request_id, [input_of(it)], it.position + 1)
    record_decode_inputs(states, items)

    new_slots: list[int] = []  # host ints: one tensor for the batch, not one per request
    allocated: list[tuple[str, list[int]]] = []
    try:
        for it in batch.items:
            new_slots.extend(pool.allocate_ids(it.request_id, [it.position]))
            allocated.append((it.request_id, [it.position]))
    except BaseException:
        undo_allocations(pool, allocated)
        raise
    slot_ids = torch.tensor(new_slots, dtype=torch.int64, device=model.device)  # [B]
    all_slots = [pool.slots_of(it.request_id) for it in batch.items]
    tokens_host, positions_host = [input_of(it) for it in items], [it.position for it in items]
    try:
        # requests sharing a prefix (prefix-cache readers): read it once per layer, eagerly
        # (the captured graphs attend request by request)
        cascade = shared_prefix_layout(pool, [it.request_id for it in batch.items], [1] * len(batch.items))
        if (
            cascade is None
            and graphs is not None
            and graphs.fits(len(batch.items), max(s.numel() for s in all_slots))
        ):
            hidden = graphs.hidden(tokens_host, positions_host, slot_ids, all_slots)
        else:
            hidden = decode_forward(model, pool, tokens_host, positions_host, slot_ids, all_slots, cascade)
    except BaseException:
        undo_allocations(pool, allocated)
        raise
    logits = model.compute_logits(hidden)  # [B, V] fp32
    sampled = sample(
        logits, [decode_sample_row(states[it.request_id], it) for it in items], model.arch.eos_token_ids
    )
    for it, tok in zip(items, sampled):  # the inputs of a look-ahead step, if one follows
        states[it.request_id].sampled = (it.position + 1, tok.token_id)
    return sampled


def shared_prefix_layout(
    pool: KVPool, request_ids: list[str], query_counts: list[int]
) -> CascadeLayout | None:
    """The cascade layout of these requests' slots in `pool` (host lists; the pool's record
    of shared prefixes bounds the search), None when none shares a prefix with another."""
    hints = [pool.shared_prefix_len(rid) for rid in request_ids]
    if sum(1 for h in hints if h) < 2:
        return None
    lists = [pool.slot_list(rid) for rid in request_ids]
    tensors = [pool.slots_of(rid) for rid in request_ids]
    return CascadeLayout.build(lists, query_counts, pool.device, hints, slot_tensors=tensors)


def decode_forward(
    model: CausalLM,
    pool: KVPool,
    token_ids: list[int],
    positions: list[int],
    slot_ids: torch.Tensor,
    all_slots: list[torch.Tensor],
    cascade: CascadeLayout | None = None,
) -> torch.Tensor:
    """The eager decode step of B requests -> hidden [B, H]: per layer, write each new
    token's K/V into its slot (slot_ids [B]), then attend over the request's slots
    (all_slots[b], the new one included); with `cascade` (built from the same slots) a
    prefix several requests share is read once for all of them."""
    device = model.device
    token_t = torch.tensor(token_ids, dtype=torch.int64, device=device)
    position_t = torch.tensor(positions, dtype=torch.int64, device=device)
    gathered = torch.cat(all_slots)
    cu_slots = _cu([s.numel() for s in all_slots], device)
    host_slots = HostSeqs.from_lengths([s.numel() for s in all_slots])
    cu_q = torch.arange(len(token_ids) + 1, dtype=torch.int64, device=device)
    host_q = HostSeqs.from_lengths([1] * len(token_ids))

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv_layer = pool.layer(layer_idx)
        kernels.write_kv(kv_layer, slot_ids, k, v)
        if cascade is not None:
            o, _ = cascade_slot_attention(q, cu_q, kv_layer, cascade, scale=model.scale, host_q=host_q)
            return o
        o, _ = kernels.slot_attention(
            q, cu_q, kv_layer, gathered, cu_slots, scale=model.scale, host_q=host_q, host_slots=host_slots
        )
        return o

    return model.forward(token_t, position_t, attn)
