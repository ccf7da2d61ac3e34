"""How one instance splits its memory: weights, an activation reserve, and the KV pool.

Torch-free, so the app can check a config before any instance starts (a budget that
cannot hold the model fails `serve run` in seconds, naming the numbers and the key to
change) and each instance can size its pool from what it measured. The rule is the one
of vLLM's `gpu_memory_utilization` and SGLang's `mem_fraction_static`:

    budget = weights + activation reserve + KV pool
    KV pool slots = (budget - weights - activations) / KV bytes per token

The activation reserve bounds the largest prefill piece one instance runs at once
(`piece_tokens`): a longer prompt is chunked or striped over more instances, never run
in one piece that would not fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from esp_core.runtime.config import ModelArch

GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the fewest KV slots worth starting an instance for: one full prefill piece of a short prompt
MIN_POOL_SLOTS = 1024
# the pool's free list is a Python list: past this many slots it costs more than it gives
MAX_POOL_SLOTS = 1 << 20
# the attention kernels' score buffers and the sampler's logits: a fixed workspace
_FIXED_WORKSPACE_BYTES = 96 * MIB
# intermediate tensors are freed and re-made in the allocator; leave it room to fragment
_ACTIVATION_SLACK = 2.0
# at most this share of what the weights leave goes to activations: the rest is KV (a
# bigger piece only makes a long prefill cheaper per chunk; KV decides what fits at all)
_ACTIVATION_SHARE = 0.25


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold the weights, the activations and a minimum KV pool."""


@dataclass(frozen=True)
class PoolPlan:
    """One instance's memory split (bytes) and the resulting pool."""

    budget_bytes: int
    weight_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int
    kv_slots: int
    piece_tokens: int  # the largest prefill piece the activation reserve holds

    @property
    def kv_bytes(self) -> int:
        return self.kv_slots * self.kv_bytes_per_token

    def describe(self) -> str:
        return (
            f"KV pool {self.kv_slots} tokens ({self.kv_bytes / GIB:.2f} GiB at "
            f"{self.kv_bytes_per_token / 1024:.1f} KiB/token); weights {self.weight_bytes / GIB:.2f} GiB, "
            f"activations {self.activation_bytes / GIB:.2f} GiB for prefill pieces of "
            f"{self.piece_tokens} tokens; budget {self.budget_bytes / GIB:.2f} GiB"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "kv_slots": self.kv_slots,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "budget_bytes": self.budget_bytes,
            "piece_tokens": self.piece_tokens,
        }


def activation_bytes_per_token(arch: ModelArch, dtype_bytes: int) -> int:
    """Live intermediate bytes per token of one layer's forward (freed layer by layer).

    Residual + normed input [H], fused QKV and the roped q/k copies [(Hq + 2 Hkv) D] x 2,
    attention output [Hq D], gate/up [2 I] and their product [I], the fp32 RMSNorm copy [H].
    """
    h, i = arch.hidden_size, arch.intermediate_size
    qkv = arch.q_size + 2 * arch.kv_size
    elems = 3 * h + 2 * qkv + arch.q_size + 3 * i
    return int((elems * dtype_bytes + 8 * h) * _ACTIVATION_SLACK)


def weight_bytes(arch: ModelArch, dtype_bytes: int) -> int:
    """The weights in the serving dtype (q/k/v and gate/up are fused: a copy while fusing)."""
    return arch.num_params * dtype_bytes


def plan_pool(
    arch: ModelArch,
    dtype: str,
    budget_bytes: int,
    weights: int,
    piece_tokens: int,
    kv_slots: int | None = None,
) -> PoolPlan:
    """Size (or check) one instance's KV pool; raise MemoryBudgetError naming what to change.

    `kv_slots` None sizes the pool from the budget; an int is an explicit override, which
    must fit too. `piece_tokens` is cut (never below MIN_POOL_SLOTS' worth of prompt) when
    its activations would leave less than a minimum pool.
    """
    nbytes = DTYPE_BYTES[dtype]
    per_token = arch.kv_bytes_per_token(nbytes)
    act_per_token = activation_bytes_per_token(arch, nbytes)
    logits = arch.vocab_size * 4 * 2  # fp32 logits of a sampled row and their softmax

    def activations(tokens: int) -> int:
        return _FIXED_WORKSPACE_BYTES + tokens * act_per_token + logits

    need_slots = MIN_POOL_SLOTS if kv_slots is None else kv_slots
    free = budget_bytes - weights - need_slots * per_token
    # the largest piece the rest holds, at most the asked one and the activations' share
    fit = (free - _FIXED_WORKSPACE_BYTES - logits) // act_per_token
    share = int(_ACTIVATION_SHARE * (budget_bytes - weights - _FIXED_WORKSPACE_BYTES)) // act_per_token
    piece = int(min(piece_tokens, fit, max(share, 256)))
    if piece < min(piece_tokens, 256):
        need = weights + activations(min(piece_tokens, 256)) + need_slots * per_token
        pool_words = f"{need_slots} KV tokens" + (
            f" (cluster.kv_slots_per_instance: {kv_slots})" if kv_slots is not None else " (the minimum pool)"
        )
        raise MemoryBudgetError(
            f"one instance needs {need / GIB:.2f} GiB but its memory budget is "
            f"{budget_bytes / GIB:.2f} GiB: weights {weights / GIB:.2f} GiB "
            f"({arch.num_params / 1e6:.0f}M parameters in {dtype}), activations "
            f"{activations(min(piece_tokens, 256)) / GIB:.2f} GiB, {pool_words} at "
            f"{per_token / 1024:.1f} KiB/token = {need_slots * per_token / GIB:.2f} GiB. "
            "Raise the budget (cluster.memory_fraction or cluster.memory_gib_per_instance), "
            + (
                "lower or remove cluster.kv_slots_per_instance, "
                if kv_slots is not None
                else "use fewer instances per node, "
            )
            + "or serve in a smaller dtype"
        )
    if kv_slots is None:
        kv_slots = int(min(MAX_POOL_SLOTS, (budget_bytes - weights - activations(piece)) // per_token))
    return PoolPlan(budget_bytes, weights, activations(piece), per_token, int(kv_slots), piece)


def host_memory_bytes() -> int:
    """Physical memory of this machine (the cgroup limit where one is set and lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def cpu_budget_bytes(fraction: float | None, gib: float | None, instances_per_node: int) -> int:
    """One CPU instance's budget: explicit GiB, else its share of `fraction` of host memory."""
    if gib is not None:
        return int(gib * GIB)
    return int(host_memory_bytes() * float(fraction or 0.0) / max(1, instances_per_node))
