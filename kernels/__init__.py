"""Attention ops for ESP: every op returns the log-sum-exp beside the output so partial
results computed on different instances (ring steps, KV holders) merge exactly.

Public API (shapes; T = tokens, H = heads, D = head_dim, B = requests; Hq a multiple of
Hkv, query head h reads kv head h // (Hq // Hkv); q/k/v share one of fp16/bf16/fp32):
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

LSE convention (DESIGN 3.1): natural log of *scaled* scores, lse = log sum_j exp(q.k_j *
scale) with scale = 1/sqrt(D) by default; fp32; [tokens, heads]. A row with no visible
key has o = 0 and lse = -inf. o is the normalised (softmax-weighted) output.

Backends: "torch" (kernels/reference.py: blockwise, bounded memory, the CPU production
path), "triton" (kernels/triton_*.py: GPU), "flash" (kernels/flash_adapter.py:
flash-attn where the mask maps onto it, Triton otherwise); "auto" picks by the inputs'
device. The tiny dense ground truth used by the tests is kernels/naive.py; the GPU
benchmark is `python -m kernels.bench`; `python -m kernels.compile_check` builds every
Triton kernel for sm_80/sm_90 without a GPU.
"""

from __future__ import annotations

from kernels.api import (
    attention_accumulate,
    available_backends,
    get_backend,
    merge_partials,
    set_backend,
    slot_attention,
    varlen_attention,
    write_kv,
)

__all__ = [
    "attention_accumulate",
    "available_backends",
    "get_backend",
    "merge_partials",
    "set_backend",
    "slot_attention",
    "varlen_attention",
    "write_kv",
]
