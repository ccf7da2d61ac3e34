"""Which TP degrees a model splits over, and the shape one TP rank computes (torch-free,
so `app/` validates `cluster.tensor_parallel_size` and sizes memory without torch; the
sharding itself is esp_core/runtime/tensor_parallel.py)."""

from __future__ import annotations

import dataclasses

from esp_core.runtime.config import ModelArch


def check_tp_size(arch: ModelArch, size: int) -> None:
    """Raise ValueError unless `arch` splits evenly over `size` TP ranks."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if arch.num_heads % size:
        raise ValueError(f"num_heads ({arch.num_heads}) is not divisible by tensor_parallel_size {size}")
    if arch.intermediate_size % size:
        raise ValueError(
            f"intermediate_size ({arch.intermediate_size}) is not divisible by tensor_parallel_size {size}"
        )
    if arch.num_kv_heads % size and size % arch.num_kv_heads:
        raise ValueError(
            f"num_kv_heads ({arch.num_kv_heads}) and tensor_parallel_size {size}: one must divide the other"
        )


def valid_tp_sizes(arch: ModelArch) -> list[int]:
    """Every TP degree `check_tp_size` accepts for `arch` (1 up to its query heads)."""
    out = []
    for size in range(1, arch.num_heads + 1):
        try:
            check_tp_size(arch, size)
        except ValueError:
            continue
        out.append(size)
    return out


def local_arch(arch: ModelArch, size: int) -> ModelArch:
    """The architecture one TP rank computes: its heads and MLP width (vocab stays global)."""
    check_tp_size(arch, size)
    if size == 1:
        return arch
    return dataclasses.replace(
        arch,
        num_heads=arch.num_heads // size,
        num_kv_heads=max(1, arch.num_kv_heads // size),
        intermediate_size=arch.intermediate_size // size,
    )
