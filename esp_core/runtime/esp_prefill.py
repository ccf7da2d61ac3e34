"""A prefill batch on a ring of several instances (architecture.md §3.1, 3.2, 4), this instance's part.

Per batch, on logical rank r of ring S (= `batch.instances`):
* tokens: each item's chunk [start, end) is striped, token g on rank (g + offset) % P; this
  rank embeds and runs the dense layers on its tokens only (token-local, RoPE from the
  *global* positions);
* attention per layer: striped ring attention among the chunk's tokens (causal on global
  positions), plus, for a chunk with cached KV (start > 0), remote partial attention of
  its queries to the request's KV on `cached_holders`; both merged by LSE;
* scale-down: this rank allocates slots for the positions `keep` assigns to it and copies
  them out of every K/V block passing through the ring (`KeepWriter`); ranks not named in
  `keep` store nothing;
* sampling: only the rank holding an item's last token computes its logits and samples.

Requirements on the plan (checked, with a clear error): every `keep` instance and every
cached holder is a member of the ring (a holder outside the ring would not know it must
serve the batch's queries).
"""

from __future__ import annotations

import torch

from esp_core.runtime.comm import P2PComm
from esp_core.runtime.config import ModelArch
from esp_core.runtime.distributed_decode import QueryGroup, RemotePartialAttention
from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.local_exec import (
    _state,
    kept_positions,
    prefill_sample_row,
    undo_allocations,
)
from esp_core.runtime.model import CausalLM, check_step_inputs
from esp_core.runtime.request_state import RequestState
from esp_core.runtime.ring_attention import KeepWriter, RingAttention, StripedChunk
from esp_core.runtime.sampling import sample
from esp_core.sched.plan import PrefillBatch, PrefillItem, SampledToken
from esp_serve.kernels.api import merge_partials


def check_prefill_plan(batch: PrefillBatch) -> None:
    ring = set(batch.instances)
    if len(ring) != len(batch.instances):
        raise ValueError(f"prefill batch {batch.batch_id}: ring {batch.instances} repeats an instance")
    for item in batch.items:
        outside = {k.instance for k in item.keep} - ring
        if outside:
            raise ValueError(
                f"prefill batch {batch.batch_id}, request {item.request_id!r}: keep "
                f"instances {sorted(outside)} are not in the ring {batch.instances} "
                "(the decode set must be a subset of the prefill set)"
            )
        if item.tokens.start > 0:
            if not item.cached_holders:
                raise ValueError(
                    f"request {item.request_id!r}: chunk starts at "
                    f"{item.tokens.start} but names no cached_holders"
                )
            outside = set(item.cached_holders) - ring
            if outside:
                raise ValueError(
                    f"prefill batch {batch.batch_id}, request {item.request_id!r}: "
                    f"cached holders {sorted(outside)} are not in the ring "
                    f"{batch.instances}; put them in the batch's instances"
                )


def chunk_ids(state: RequestState, item: PrefillItem) -> list[int]:
    """Token ids of a chunk: prompt ids, then the chunk's `extra_token_ids` (the outputs it
    re-prefills). Unlike `local_exec.chunk_token_ids` this does not need the instance to
    have seen every earlier output: a later chunk of a re-prefill may run on instances that
    missed the earlier chunks. The outputs are recorded where they extend what is known."""
    first_extra = max(item.tokens.start, state.prompt_len)
    if item.tokens.end > state.prompt_len and len(item.extra_token_ids) != item.tokens.end - first_extra:
        raise ValueError(
            f"request {item.request_id!r}: {len(item.extra_token_ids)} "
            f"extra_token_ids for positions [{first_extra}, {item.tokens.end})"
        )
    if first_extra - state.prompt_len <= len(state.output_ids):
        state.record_outputs_from(first_extra, item.extra_token_ids)
    return list(state.prompt_ids[item.tokens.start : item.tokens.end]) + list(item.extra_token_ids)


def prefill_esp(
    model: CausalLM,
    pool: KVPool,
    states: dict[str, RequestState],
    batch: PrefillBatch,
    instance: int,
    comm: P2PComm,
) -> list[SampledToken]:
    """Run this instance's part of a multi-instance prefill batch; returns the tokens it
    sampled (the items whose last token lives here)."""
    check_prefill_plan(batch)
    a, device = model.arch, model.device
    ring = tuple(batch.instances)
    chunks = [StripedChunk(it.tokens.start, it.tokens.end, it.stripe_offset) for it in batch.items]
    ring_attn = RingAttention(
        comm, ring, chunks, a.num_kv_heads, a.head_dim, model.dtype, device, scale=model.scale
    )
    local = ring_attn.local
    token_ids = _local_token_ids(states, batch, local, a).to(device)  # [n]
    cross = _cross_attention(model, pool, batch, instance, comm, ring_attn)
    rows, rows_idx = _sampling_rows(states, batch, ring.index(instance), local)
    allocated: list[tuple[str, list[int]]] = []
    try:
        slot_of = _allocate_kept(pool, batch, instance, allocated)
        ring_attn.on_block = KeepWriter(pool.kv, ring_attn.blocks, chunks, slot_of)
        attn = _attention_fn(ring_attn, cross, pool)
        if local.num_tokens:
            hidden = model.forward(token_ids, local.positions.to(device), attn)  # [n, H]
        else:
            # No token of this batch lands here (e.g. a 1-token chunk on a ring of 2), but
            # the rank still relays K/V blocks, keeps its share and serves cross attention.
            q0 = torch.empty(0, a.num_heads, a.head_dim, dtype=model.dtype, device=device)
            kv0 = torch.empty(0, a.num_kv_heads, a.head_dim, dtype=model.dtype, device=device)
            with torch.inference_mode():
                for layer_idx in range(a.num_layers):
                    attn(layer_idx, q0, kv0, kv0)
    except BaseException:
        undo_allocations(pool, allocated)  # a failed batch must not leak its slots
        raise

    if not rows:
        return []
    logits = model.compute_logits(hidden[rows_idx])  # [n, V] fp32
    return sample(logits, rows, a.eos_token_ids)


def _local_token_ids(
    states: dict[str, RequestState], batch: PrefillBatch, local, arch: ModelArch
) -> torch.Tensor:
    """Token ids of this rank's share of every chunk, in local order ([n] int64). Every
    instance records re-prefilled outputs, so sampling state stays identical wherever the
    request is mastered later, and checks the whole chunk, so a bad input fails every rank
    of the ring alike."""
    cu = local.index.cu_seqlens
    local_ids = []
    for i, item in enumerate(batch.items):
        chunk = chunk_ids(_state(states, item.request_id), item)
        check_step_inputs(arch, item.request_id, chunk, item.tokens.end)
        ids = torch.tensor(chunk, dtype=torch.int64)
        local_ids.append(ids[local.positions[cu[i] : cu[i + 1]] - item.tokens.start])
    return torch.cat(local_ids) if local_ids else torch.zeros(0, dtype=torch.int64)


class _CrossAttention:
    """Chunked prefill's attention to a request's cached KV (earlier chunks, on their
    holders), for the local rows `rows` of the batch (all of them when `all_rows`)."""

    def __init__(self, remote: RemotePartialAttention, rows: torch.Tensor, all_rows: bool) -> None:
        self.remote, self.rows, self.all_rows = remote, rows, all_rows


def _cross_attention(
    model: CausalLM, pool: KVPool, batch: PrefillBatch, instance: int, comm: P2PComm, ring_attn: RingAttention
) -> _CrossAttention | None:
    """Snapshot this instance's slots of each request with cached KV BEFORE this batch
    allocates its own, so every cached token is seen exactly once."""
    cached = [i for i, it in enumerate(batch.items) if it.tokens.start > 0]
    if not cached:
        return None
    a, ring = model.arch, tuple(batch.instances)
    counts = [blk.counts() for blk in ring_attn.blocks]  # [rank][item]
    groups = [
        QueryGroup(batch.items[i].request_id, ring[rr], counts[rr][i], tuple(batch.items[i].cached_holders))
        for i in cached
        for rr in range(len(ring))
    ]
    local_slots = {
        batch.items[i].request_id: pool.slots_of(batch.items[i].request_id)
        for i in cached
        if instance in batch.items[i].cached_holders
    }
    remote = RemotePartialAttention(
        comm, groups, a.num_heads, a.head_dim, local_slots, model.device, scale=model.scale
    )
    cu = ring_attn.local.index.cu_seqlens
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in cached]).to(model.device)
    return _CrossAttention(remote, rows, rows.numel() == ring_attn.local.num_tokens)


def _sampling_rows(
    states: dict[str, RequestState], batch: PrefillBatch, rank: int, local
) -> tuple[list, list[int]]:
    """(sample rows, their local row indices) of the items this rank samples: the rank
    holding an item's last token, which is its last local token of the item. Every rank
    validates every row before any slot is taken, so a bad plan fails on all ranks alike
    instead of leaving the others waiting in the ring."""
    P = len(batch.instances)
    cu = local.index.cu_seqlens
    sample_rows = {
        i: prefill_sample_row(_state(states, it.request_id), it)
        for i, it in enumerate(batch.items)
        if it.sample
    }
    sampling_items = [
        i for i in sample_rows if (batch.items[i].tokens.end - 1 + batch.items[i].stripe_offset) % P == rank
    ]
    return [sample_rows[i] for i in sampling_items], [cu[i + 1] - 1 for i in sampling_items]


def _allocate_kept(
    pool: KVPool, batch: PrefillBatch, instance: int, allocated: list[tuple[str, list[int]]]
) -> list[torch.Tensor]:
    """Scale-down: slots for the positions this instance keeps, per item ([len] int64,
    -1 where another instance keeps the token). `allocated` records what to undo."""
    slot_of = []
    for item in batch.items:
        s = [-1] * len(item.tokens)
        keep = kept_positions(item, instance)
        if keep:
            slots = pool.allocate_ids(item.request_id, keep)
            allocated.append((item.request_id, keep))
            for pos, slot in zip(keep, slots):
                s[pos - item.tokens.start] = slot
        slot_of.append(torch.tensor(s, dtype=torch.int64))
    return slot_of


def _attention_fn(ring_attn: RingAttention, cross: _CrossAttention | None, pool: KVPool):
    """The model's attention for this batch: ring attention over the chunk's own tokens,
    merged with the cross attention to cached KV where there is any."""

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, lse = ring_attn.layer(layer_idx, q, k, v)  # [n, Hq, D], [n, Hq]
        if cross is None:
            return o
        q_c = q if cross.all_rows else q.index_select(0, cross.rows)
        o_c, lse_c = cross.remote.layer(pool.layer(layer_idx), q_c)
        if not cross.all_rows:  # rows without cached KV get an empty partial
            o_c = torch.zeros(o.shape, dtype=torch.float32, device=o.device).index_copy_(0, cross.rows, o_c)
            lse_c = torch.full(lse.shape, float("-inf"), device=o.device).index_copy_(0, cross.rows, lse_c)
        merged, _ = merge_partials([o.float(), o_c], [lse, lse_c])
        return merged.to(q.dtype)

    return attn
