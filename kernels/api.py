"""Attention ops for ESP: every op returns the log-sum-exp beside the output so partial
results computed on different instances (ring steps, KV holders) merge exactly.

The attention API (`from esp_serve.kernels import api`). Shapes: T = tokens, H = heads,
D = head_dim, B = requests; Hq a multiple of Hkv, query head h reads kv head h // (Hq // Hkv); q/k/v share one of fp16/bf16/fp32):
* `varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=None,
  causal=True) -> (o [Tq, Hq, D] in q's dtype, lse [Tq, Hq] fp32)`: prefill / ring-step
  attention. q [Tq, Hq, D], k/v [Tk, Hkv, D]; q_pos [Tq], k_pos [Tk] int *global*
  positions; cu_seqlens_q/k [B+1] int offsets. Query i of request b sees key j of request
  b iff q_pos[i] >= k_pos[j] (causal) or always (causal=False). Any layout: contiguous,
  striped (rank r holds positions r, r+P, ... with rotated offsets), chunk after cache.
* `attention_accumulate(o_acc, lse_acc, q, k, v, q_pos, k_pos, cu_seqlens_q,
  cu_seqlens_k, scale=None, causal=True) -> (o_acc, lse_acc)`: the same, merged into a
  running (o_acc [Tq, Hq, D], lse_acc [Tq, Hq] fp32) in place (ring attention's online
  softmax across steps). Start from o = 0, lse = -inf; keep o_acc fp32 for exactness.
* `slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=None) -> (o, lse)`:
  partial attention over KV gathered from the token-slot pool (decode, and chunked
  prefill's attention to cached KV), no mask. kv_layer [slots, 2, Hkv, D] (one layer of
  the pool), slot_ids [S] int (request after request, any order), cu_slots [B+1]. A
  request with no slots gets o = 0, lse = -inf.
* `merge_partials(outs, lses) -> (o, lse)`: o_i [T, H, D], lse_i [T, H]; guarded LSE
  merge, exact with -inf partials (their o is ignored even if garbage), never NaN.
* `write_kv(kv_layer, slot_ids, k, v)`: store k/v [n, Hkv, D] into slots slot_ids [n].
* `set_backend(name)`, `get_backend()`, `available_backends()`.

Host layout (`kernels/host_layout.py`): `varlen_attention` and `attention_accumulate` take
keyword `host_q=` / `host_k=`, `slot_attention` `host_q=` / `host_slots=`: `HostSeqs`, the
host copies of the offsets (and, for varlen, of the positions' progressions). With them no
wrapper reads a device tensor back, so a step never waits for the GPU to drain; without
them the wrappers read the offsets (and the flash adapter the positions) themselves.

LSE convention (architecture.md §3.1): natural log of *scaled* scores, lse = log sum_j exp(q.k_j *
scale) with scale = 1/sqrt(D) by default; fp32; [tokens, heads]. A row with no visible
key has o = 0 and lse = -inf. o is the normalised (softmax-weighted) output.

The tiny dense ground truth used by the tests is kernels/naive.py; the GPU
benchmark is `python -m esp_serve.kernels.bench`; `python -m
esp_serve.kernels.compile_check` builds every Triton kernel for sm_80/sm_90 without a GPU.

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

from esp_serve.kernels import reference

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
    from esp_serve.kernels import flash_adapter

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
        raise ValueError(
            f"attention backend {name!r} is not available here (available: {available_backends()})"
        )
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


def varlen_attention(
    q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=None, causal=True, *, host_q=None, host_k=None
):
    """Prefill / ring-step attention; see the module docstring. -> (o [Tq, Hq, D], lse [Tq, Hq])."""
    host = dict(host_q=host_q, host_k=host_k)
    if _gpu_kernels(q):
        from esp_serve.kernels import flash_adapter, triton_prefill

        if _backend in ("flash", "auto") and flash_adapter.supports(q) and _flash_usable():
            res = flash_adapter.varlen_attention(
                q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale, causal, **host
            )
            if res is not None:
                return res
        if triton_prefill.supports(q) or _backend != "auto":
            return triton_prefill.varlen_attention(
                q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale, causal, **host
            )
    return reference.varlen_attention(
        q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal, **host
    )


def attention_accumulate(
    o_acc,
    lse_acc,
    q,
    k,
    v,
    q_pos,
    k_pos,
    cu_seqlens_q,
    cu_seqlens_k,
    scale=None,
    causal=True,
    *,
    host_q=None,
    host_k=None,
):
    """Compute attention of this K/V block and merge it into (o_acc, lse_acc) in place.

    o_acc [Tq, Hq, D] (fp32 recommended: a 16-bit accumulator rounds once per ring step),
    lse_acc [Tq, Hq] fp32; start from o = 0, lse = -inf. Returns (o_acc, lse_acc).
    """
    if _gpu_kernels(q):
        from esp_serve.kernels import triton_prefill

        fused = (
            triton_prefill.supports(q)
            and o_acc.stride(2) == 1
            and lse_acc.dtype == torch.float32
            and _backend != "flash"
        )
        if fused:  # Triton merges in its epilogue: no extra pass over o
            triton_prefill.varlen_attention(
                q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale, causal,
                out=o_acc, lse_out=lse_acc, host_q=host_q, host_k=host_k,
            )  # fmt: skip
            return o_acc, lse_acc
    o, lse = varlen_attention(
        q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale, causal, host_q=host_q, host_k=host_k
    )
    merged_o, merged_lse = merge_partials([o_acc, o], [lse_acc, lse])
    o_acc.copy_(merged_o)
    lse_acc.copy_(merged_lse)
    return o_acc, lse_acc


def slot_attention(
    q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=None, *, host_q=None, host_slots=None, max_slots=None
):
    """Decode partial attention over pool slots; see the module docstring.

    max_slots: instead of host_slots, a bound on every request's slot count, for a launch
    recorded once and replayed with other offsets (CUDA graphs): the Triton kernel then
    sizes its KV split from the bound and reads the offsets on the device only.
    """
    host = dict(host_q=host_q, host_slots=host_slots)
    if _gpu_kernels(q):
        from esp_serve.kernels import triton_decode

        if triton_decode.supports(q) or _backend != "auto":
            return triton_decode.slot_attention(
                q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale, max_slots=max_slots, **host
            )
    if max_slots is not None:
        raise ValueError("max_slots (a replayed launch) needs the Triton decode kernel (a CUDA device)")
    return reference.slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=scale, **host)


def merge_partials(outs, lses):
    """Guarded LSE merge of k partials; see `kernels/__init__.py`."""
    if _gpu_kernels(outs[0]):
        from esp_serve.kernels import triton_merge

        return triton_merge.merge_partials(outs, lses)
    return reference.merge_partials(outs, lses)


def write_kv(kv_layer, slot_ids, k, v):
    """Store k/v [n, Hkv, D] into pool slots (an indexed copy: torch on every backend)."""
    return reference.write_kv(kv_layer, slot_ids, k, v)
