"""Backend dispatch for the attention ops (see `kernels/__init__.py` for the contract)."""

from __future__ import annotations

import torch

from kernels import reference

_BACKENDS = ("auto", "torch", "triton", "flash")
_backend = "auto"


def available_backends() -> list[str]:
    """Backends usable in this process (GPU backends need CUDA and their packages)."""
    names = ["torch"]
    return names


def set_backend(name: str) -> None:
    """Select the attention backend for this process: auto, torch, triton or flash."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {_BACKENDS}")
    if name not in ("auto", *available_backends()):
        raise ValueError(f"attention backend {name!r} is not available here "
                         f"(available: {available_backends()})")
    _backend = name


def get_backend() -> str:
    return _backend


def _impl(device: torch.device):
    # Only the torch reference exists so far; GPU backends plug in here.
    return reference


def varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=None, causal=True):
    return _impl(q.device).varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k,
                                            scale=scale, causal=causal)


def attention_accumulate(o_acc, lse_acc, q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k,
                         scale=None, causal=True):
    """Compute attention of this K/V block and merge it into (o_acc, lse_acc) in place."""
    o, lse = varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale, causal)
    merged_o, merged_lse = merge_partials([o_acc, o], [lse_acc, lse])
    o_acc.copy_(merged_o)
    lse_acc.copy_(merged_lse)
    return o_acc, lse_acc


def slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=None):
    return _impl(q.device).slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=scale)


def merge_partials(outs, lses):
    return _impl(outs[0].device).merge_partials(outs, lses)


def write_kv(kv_layer, slot_ids, k, v):
    return _impl(kv_layer.device).write_kv(kv_layer, slot_ids, k, v)
