"""Attention ops for ESP: every op returns the log-sum-exp beside the output so partial
results computed on different instances (ring steps, KV holders) merge exactly.

Public API (shapes; T = tokens, H = heads, D = head_dim, B = requests):
* `varlen_attention(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, scale=None,
  causal=True) -> (o [Tq, Hq, D], lse [Tq, Hq] fp32)`: prefill / ring-step attention,
  causal mask on *global* positions (striped layouts welcome).
* `attention_accumulate(o_acc, lse_acc, q, k, v, ...)`: the same, merged into a running
  (o, lse) in place (ring attention's online softmax across steps).
* `slot_attention(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, scale=None)`: partial
  attention over KV gathered from the token-slot pool (decode, and chunked prefill's
  attention to cached KV); a request with no slots gives o = 0, lse = -inf.
* `merge_partials(outs, lses) -> (o, lse)`: guarded LSE merge, exact with -inf partials.
* `write_kv(kv_layer, slot_ids, k, v)`: store new K/V into pool slots.

LSE convention: natural log of scaled scores, fp32. Backends: "torch" (reference, CPU),
"triton" and "flash" (GPU), chosen by `set_backend` ("auto" picks the fastest available
for the device of the inputs).
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
