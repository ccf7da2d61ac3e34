"""A decode step over several instances (architecture.md §3.3), this instance's part.

* Every instance of the batch records each item's `output_prefix` and `input_token` into
  the request's state, so whichever instance masters the request next samples with the
  same history (penalties), and randomness is keyed on (seed, output index) only.
* A master runs the dense layers of its items (embedding, QKV, output projection, MLP,
  LM head, sampling) with `DecodeAttention.attend` as the model's attention: per layer
  its queries go to the request's holders, partials come back and are merged with its
  own partial and with the new token's attention to itself.
* An instance that masters nothing still serves every layer's exchange.
* After the last layer the new token's K/V (all layers) is stored on `new_kv_instance`,
  possibly an instance holding nothing of the request yet (scale-up; no KV moves).
"""

from __future__ import annotations

import torch

from esp_core.runtime.comm import P2PComm
from esp_core.runtime.distributed_decode import DecodeAttention, DecodeSlot
from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.local_exec import (
    _state,
    decode_sample_row,
    input_of,
    shared_prefix_layout,
    undo_allocations,
)
from esp_core.runtime.model import CausalLM, check_step_inputs
from esp_core.runtime.request_state import RequestState
from esp_core.runtime.sampling import sample
from esp_core.sched.plan import DecodeBatch, SampledToken


def check_decode_plan(batch: DecodeBatch) -> None:
    members = set(batch.instances)
    for it in batch.items:
        named = {it.master, it.new_kv_instance, *it.holders}
        if not named <= members:
            raise ValueError(
                f"decode batch {batch.batch_id}, request {it.request_id!r}: "
                f"instances {sorted(named - members)} (master/holders/new KV) are "
                f"not in the batch's instances {batch.instances}"
            )


def decode_esp(
    model: CausalLM,
    pool: KVPool,
    states: dict[str, RequestState],
    batch: DecodeBatch,
    instance: int,
    comm: P2PComm,
) -> list[SampledToken]:
    """Run this instance's part of a multi-instance decode step; returns the tokens it
    sampled (one per item it masters)."""
    check_decode_plan(batch)
    a, device = model.arch, model.device
    # Every instance checks every item, so a bad input fails the whole batch alike (a
    # look-ahead item, input_token=None, runs on one instance only: an error here).
    for it in batch.items:
        check_step_inputs(a, it.request_id, [input_of(it)], it.position + 1)
    # Like local_exec.record_decode_inputs, but an instance that only holds KV (e.g. one
    # added by scale-up that never saw the NewRequest) may lack the request's state.
    for it in batch.items:
        state = states.get(it.request_id)
        if state is None:
            if it.master == instance:
                _state(states, it.request_id)  # raises with a clear message
            continue
        if it.output_prefix:
            state.record_outputs_from(state.prompt_len, it.output_prefix)
        state.record_token(it.position, input_of(it))

    slots = [
        DecodeSlot(it.request_id, it.position, it.master, tuple(it.holders), it.new_kv_instance)
        for it in batch.items
    ]
    # Slots this instance holds now (before the new tokens are stored): fixed for the step.
    local_slots = {
        it.request_id: pool.slots_of(it.request_id) for it in batch.items if instance in it.holders
    }
    # local partials read a prefix their requests share once (prefix-cache readers)
    dec = DecodeAttention(
        comm,
        slots,
        pool.kv,
        a.num_heads,
        local_slots,
        scale=model.scale,
        cascade=lambda rids, counts: shared_prefix_layout(pool, rids, counts),
    )
    mastered = [it for it in batch.items if it.master == instance]
    if mastered:
        ids = torch.tensor([input_of(it) for it in mastered], dtype=torch.int64, device=device)
        pos = torch.tensor([it.position for it in mastered], dtype=torch.int64, device=device)
        hidden = model.forward(ids, pos, dec.attend)  # [n, H]
    else:
        with torch.inference_mode():
            for layer_idx in range(a.num_layers):
                dec.serve(layer_idx)

    stored: list[tuple[str, int]] = []

    def allocate(request_id: str, position: int) -> int:
        (slot,) = pool.allocate_ids(request_id, [position])
        stored.append((request_id, position))
        return slot

    try:
        dec.store_new_kv(allocate)
    except BaseException:
        undo_allocations(pool, [(rid, [p]) for rid, p in stored])
        raise
    if not mastered:
        return []
    logits = model.compute_logits(hidden)  # [n, V] fp32
    rows = [decode_sample_row(states[it.request_id], it) for it in mastered]
    return sample(logits, rows, a.eos_token_ids)
