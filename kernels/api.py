"""Backend dispatch for the attention ops (see `kernels/__init__.py` for the contract).

Backends:
* "torch": `kernels/reference.py`, any device (the CPU production path);
* "triton": `kernels/triton_*.py`, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1);
* "flash": flash-attn's varlen kernel for `varlen_attention` where the mask maps onto
  it (`kernels/flash_adapter.py`), Triton for everything else;
* "auto" (default): per call, from the inputs' device: CUDA -> flash, else triton, for
  the shapes they support, else torch; CPU -> torch.

Triton and flash-attn are imported on first use only, so CPU processes never pay for them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kernels import reference

_BACKENDS = ("auto", "torch", "triton", "flash")
_backend = "auto"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _triton_usable() -> bool:
    if not _has("triton"):
        return False
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return interpreting or torch.cuda.is_available()


def _flash_usable() -> bool:
    if not (torch.cuda.is_available() and _has("flash_attn") and _triton_usable()):
        return False
    from kernels import flash_adapter
    return flash_adapter.HAVE_FLASH


def available_backends() -> list[str]:
    """Backends usable in this process: torch always; triton with CUDA (or the Triton
    interpreter); flash with CUDA, flash-attn importable and triton (its fallback)."""
    names = ["torch"]
    if _triton_usable():
        names.append("triton")
    if _flash_usable():
        names.append("flash")
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


def _gpu_kernels(t: torch.Tensor) -> bool:
    """Use the Triton/flash kernels for tensors on this device? (explicit choice, or auto
    with CUDA tensors)."""
    if _backend == "torch":
        return False
    if _backend in ("triton", "flash"):
        return True
    return t.is_cuda and _triton_usable()


def varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=None, causal=True):
    """Prefill / ring-step attention; see `kernels/__init__.py`. -> (o [Tq, Hq, D], lse [Tq, Hq])."""
    if _gpu_kernels(q):
        from kernels import flash_adapter, triton_prefill
        if _backend in ("flash", "auto") and flash_adapter.supports(q) and _flash_usable():
            res = flash_adapter.varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k,
                                                 scale, causal)
            if res is not None:
                return res
        if triton_prefill.supports(q) or _backend != "auto":
            return triton_prefill.varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k,
                                                   scale, causal)
    return reference.varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k,
                                      scale=scale, causal=causal)


def attention_accumulate(o_acc, lse_acc, q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k,
                         scale=None, causal=True):
    """Compute attention of this K/V block and merge it into (o_acc, lse_acc) in place.

    o_acc [Tq, Hq, D] (fp32 recommended: a 16-bit accumulator rounds once per ring step),
    lse_acc [Tq, Hq] fp32; start from o = 0, lse = -inf. Returns (o_acc, lse_acc).
    """
    if _gpu_kernels(q):
        from kernels import triton_prefill
        fused = (triton_prefill.supports(q) and o_acc.stride(2) == 1 and lse_acc.dtype == torch.float32
                 and _backend != "flash")
        if fused:  # Triton merges in its epilogue: no extra pass over o
            triton_prefill.varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale,
                                            causal, out=o_acc, lse_out=lse_acc)
            return o_acc, lse_acc
    o, lse = varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale, causal)
    merged_o, merged_lse = merge_partials([o_acc, o], [lse_acc, lse])
    o_acc.copy_(merged_o)
    lse_acc.copy_(merged_lse)
    return o_acc, lse_acc


def slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=None):
    """Decode partial attention over pool slots; see `kernels/__init__.py`."""
    if _gpu_kernels(q):
        from kernels import triton_decode
        if triton_decode.supports(q) or _backend != "auto":
            return triton_decode.slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale)
    return reference.slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=scale)


def merge_partials(outs, lses):
    """Guarded LSE merge of k partials; see `kernels/__init__.py`."""
    if _gpu_kernels(outs[0]):
        from kernels import triton_merge
        return triton_merge.merge_partials(outs, lses)
    return reference.merge_partials(outs, lses)


def write_kv(kv_layer, slot_ids, k, v):
    """Store k/v [n, Hkv, D] into pool slots (an indexed copy: torch on every backend)."""
    return reference.write_kv(kv_layer, slot_ids, k, v)
