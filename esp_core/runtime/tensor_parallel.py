"""Tensor parallelism inside one elastic instance (Megatron-style, vLLM's sharding).

An instance of TP degree `size` is `size` processes; TP rank `rank` holds:

* attention: query heads [rank * Hq/size, (rank+1) * Hq/size) and the KV heads they read.
  With at least as many KV heads as ranks each rank owns Hkv/size of them; with fewer, the
  one KV head of its query group is replicated on the ranks sharing it (as vLLM does), so
  the KV pool, ring attention and distributed decode all see whole heads of one rank;
* column-parallel q/k/v and gate/up projections (the rows of this rank's heads / MLP slice),
  row-parallel o and down projections (the matching columns) followed by an all-reduce;
* a vocab-parallel embedding (rows [rank * ceil(V/size), ...) looked up with the others
  masked to zero, then all-reduced) and LM head (this rank's vocab rows, all-gathered);
* everything else (norms, per-head q/k norms) replicated.

The residual stream is replicated on every TP rank, so a rank runs the same plan as an
instance of TP 1 on its head shard: ESP across instances is per TP rank (rank t of one
instance exchanges its heads' K/V and partials with rank t of the others; `RankLayout`
addresses them) and sampling repeats identically on each rank (seeded per request).

`TPContext` is what the model gets at build time; `None` means TP 1 and leaves every path
unchanged. `init_tp_groups` creates one process group per instance: gloo/NCCL require every
rank of the world to create every subgroup, in the same order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from esp_core.runtime.comm import P2PComm, RankLayout
from esp_core.runtime.config import ModelArch

# (dim, start, end) of one HF tensor that a rank holds; None: replicated.
Slice = tuple[int, int, int] | None


def kv_head_range(arch: ModelArch, rank: int, size: int) -> tuple[int, int]:
    """KV heads [lo, hi) of TP rank `rank` (one replicated head when Hkv < size)."""
    if arch.num_kv_heads >= size:
        per = arch.num_kv_heads // size
        return rank * per, (rank + 1) * per
    head = rank * arch.num_kv_heads // size
    return head, head + 1


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """Vocab rows [lo, hi) of TP rank `rank`: chunks of ceil(V/size), the last one shorter."""
    chunk = -(-vocab_size // size)
    return min(vocab_size, rank * chunk), min(vocab_size, (rank + 1) * chunk)


@functools.lru_cache(maxsize=8)
def weight_slices(arch: ModelArch, rank: int, size: int) -> dict[str, Slice]:
    """What part of each sharded HF tensor TP rank `rank` holds (names absent: replicated)."""
    d = arch.head_dim
    q_per = arch.num_heads // size
    q0, q1 = rank * q_per * d, (rank + 1) * q_per * d
    k0, k1 = (h * d for h in kv_head_range(arch, rank, size))
    i_per = arch.intermediate_size // size
    i0, i1 = rank * i_per, (rank + 1) * i_per
    v0, v1 = vocab_range(arch.vocab_size, rank, size)
    out: dict[str, Slice] = {"model.embed_tokens.weight": (0, v0, v1), "lm_head.weight": (0, v0, v1)}
    for layer in range(arch.num_layers):
        a = f"model.layers.{layer}.self_attn."
        m = f"model.layers.{layer}.mlp."
        for kind in ("weight", "bias"):
            out[a + f"q_proj.{kind}"] = (0, q0, q1)
            out[a + f"k_proj.{kind}"] = (0, k0, k1)
            out[a + f"v_proj.{kind}"] = (0, k0, k1)
        out[a + "o_proj.weight"] = (1, q0, q1)
        out[m + "gate_proj.weight"] = (0, i0, i1)
        out[m + "up_proj.weight"] = (0, i0, i1)
        out[m + "down_proj.weight"] = (1, i0, i1)
    return out


def local_shape(shape: tuple[int, ...], sl: Slice) -> tuple[int, ...]:
    if sl is None:
        return shape
    dim, lo, hi = sl
    return (*shape[:dim], hi - lo, *shape[dim + 1 :])


@dataclass
class TPContext:
    """One TP rank of one instance: its position and the process group of its instance."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TP rank {self.rank} outside a TP degree of {self.size}")

    def slices(self, arch: ModelArch) -> dict[str, Slice]:
        return weight_slices(arch, self.rank, self.size)

    def local_shapes(self, arch: ModelArch, full: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """HF name -> shape on this rank, from the full shapes of the global `arch`."""
        slices = self.slices(arch)
        return {name: local_shape(shape, slices.get(name)) for name, shape in full.items()}

    def take(self, arch: ModelArch, name: str, tensor: torch.Tensor, full_shape: tuple[int, ...]):
        """This rank's part of a full HF tensor (already-sharded tensors pass through)."""
        sl = self.slices(arch).get(name)
        if sl is None or tuple(tensor.shape) != tuple(full_shape):
            return tensor
        dim, lo, hi = sl
        return tensor.narrow(dim, lo, hi - lo)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' partial outputs x [T, H] (row-parallel layers).

        bf16/fp16 partials are summed in fp32 and rounded once, as the unsharded GEMM's
        fp32 accumulator would be (and gloo has no half-precision sum)."""
        if self.size == 1:
            return x
        acc = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        buf = self._host(acc)
        dist.all_reduce(buf, group=self.group)
        return buf.to(device=x.device, dtype=x.dtype)

    def embed(self, token_ids: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Vocab-parallel lookup: token_ids [T] -> hidden [T, H], rows of other ranks as 0."""
        lo, hi = vocab_range(vocab_size, self.rank, self.size)
        mine = (token_ids >= lo) & (token_ids < hi)
        local_ids = torch.where(mine, token_ids - lo, torch.zeros_like(token_ids))
        hidden = F.embedding(local_ids, table) * mine.unsqueeze(-1).to(table.dtype)
        return self.all_reduce(hidden)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """This rank's logits [n, V_rank] -> every rank's, concatenated: [n, V]."""
        if self.size == 1:
            return logits
        chunk = -(-vocab_size // self.size)
        padded = F.pad(logits, (0, chunk - logits.shape[-1]))  # equal sizes for all_gather
        buf = self._host(padded.contiguous())
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf, group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab_size].to(logits.device)

    def _host(self, x: torch.Tensor) -> torch.Tensor:
        # gloo reduces host memory only (the one-GPU test mode runs CUDA tensors over gloo)
        if x.is_cuda and dist.get_backend(self.group) == "gloo":
            return x.cpu()
        return x


def init_tp_groups(layout: RankLayout, backend: str | None = None, timeout_s: float = 600.0) -> TPContext:
    """Create the TP group of every instance (collective: every rank of the world calls it
    with the same layout) and return this process's `TPContext`."""
    instance, tp_rank = layout.instance_of(dist.get_rank())
    mine = None
    for inst in range(layout.num_instances):
        ranks = [layout.global_rank(inst, t) for t in range(layout.tp_size)]
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), backend=backend)
        if inst == instance:
            mine = group
    return TPContext(tp_rank, layout.tp_size, mine)


def init_tp_esp_group(
    instance: int,
    tp_rank: int,
    layout: RankLayout,
    init_method: str,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> tuple[P2PComm, TPContext]:
    """Join the ESP group's world as TP rank `tp_rank` of `instance` (every rank of every
    instance calls it): the world group, every instance's TP group, and this rank's P2P
    endpoint on its ESP plane (TP rank `tp_rank` of the other instances)."""
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=layout.global_rank(instance, tp_rank),
        world_size=layout.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    tp = init_tp_groups(layout, timeout_s=timeout_s)
    return P2PComm(instance, layout, tp_rank, None, timeout_s), tp
