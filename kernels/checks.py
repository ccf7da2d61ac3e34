"""Input validation shared by every backend: each wrapper calls these before launching
anything, so a wrong shape fails loudly in Python instead of reading out of bounds in a
kernel. Errors are ValueError (not assert, which `python -O` strips)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from esp_serve.kernels.host_layout import HostSeqs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def require(cond: bool, msg: str | Callable[[], str]) -> None:
    """Raise ValueError(msg) unless `cond`. A message that formats shapes or dtypes is
    passed as a callable: these checks run per layer per step, and formatting every
    message eagerly was a measurable part of a batch-1 decode step on CPU."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def offsets(cu: torch.Tensor, total: int, name: str) -> list[int]:
    """Validate cumulative offsets [B+1] (0, non-decreasing, ending at `total`); host list."""
    require(cu.dim() == 1 and cu.numel() >= 1, lambda: f"{name} must be 1-D [B+1], got {tuple(cu.shape)}")
    require(cu.dtype in INDEX_DTYPES, lambda: f"{name} must be int32/int64, got {cu.dtype}")
    host = cu.tolist()
    require(host[0] == 0, lambda: f"{name}[0] must be 0, got {host[0]}")
    require(host[-1] == total, lambda: f"{name}[-1] = {host[-1]} but there are {total} rows")
    require(all(a <= b for a, b in zip(host, host[1:])), lambda: f"{name} must be non-decreasing")
    return host


def host_offsets(cu: torch.Tensor, host: HostSeqs | None, total: int, name: str) -> list[int]:
    """The offsets as a host list: the caller's copy when given (checked against the
    tensor's shape and the row count, never its values: reading them is what the copy
    saves), else read back from `cu` and validated."""
    if host is None:
        return offsets(cu, total, name)
    values = list(host.cu)
    require(
        cu.dim() == 1 and cu.numel() == len(values), lambda: f"{name}: host copy has {len(values)} offsets"
    )
    require(cu.dtype in INDEX_DTYPES, lambda: f"{name} must be int32/int64, got {cu.dtype}")
    require(values[0] == 0 and values[-1] == total, lambda: f"{name} host copy must run from 0 to {total}")
    require(all(a <= b for a, b in zip(values, values[1:])), lambda: f"{name} must be non-decreasing")
    return values


def heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] with Hq a multiple of Hkv, same float dtype/device."""
    require(q.dim() == 3, lambda: f"q must be [tokens, heads, dim], got {tuple(q.shape)}")
    require(
        k.dim() == 3 and k.shape == v.shape,
        lambda: f"k and v must both be [tokens, kv_heads, dim], got {tuple(k.shape)}, {tuple(v.shape)}",
    )
    require(q.shape[2] == k.shape[2], lambda: f"head_dim differs: q {q.shape[2]}, k {k.shape[2]}")
    require(
        k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
        lambda: f"q heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}",
    )
    require(
        q.dtype in FLOAT_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype,
        lambda: f"q/k/v must share one of {FLOAT_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}",
    )
    require(q.device == k.device == v.device, "q, k, v must be on one device")


def varlen(
    q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, host_q=None, host_k=None
) -> tuple[list[int], list[int]]:
    """Validate a varlen_attention call; returns host copies of the two offset arrays
    (the caller's `HostSeqs` when given)."""
    heads(q, k, v)
    require(
        q_pos.shape == (q.shape[0],) and k_pos.shape == (k.shape[0],),
        lambda: f"q_pos/k_pos must be [Tq]/[Tk], got {tuple(q_pos.shape)}, {tuple(k_pos.shape)}",
    )
    require(q_pos.dtype in INDEX_DTYPES and k_pos.dtype in INDEX_DTYPES, "positions must be integers")
    require(q_pos.device == q.device and k_pos.device == q.device, "positions must be on q's device")
    cq = host_offsets(cu_seqlens_q, host_q, q.shape[0], "cu_seqlens_q")
    ck = host_offsets(cu_seqlens_k, host_k, k.shape[0], "cu_seqlens_k")
    require(
        len(cq) == len(ck), lambda: f"cu_seqlens_q has {len(cq) - 1} requests, cu_seqlens_k {len(ck) - 1}"
    )
    return cq, ck


def slots(
    q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, host_q=None, host_slots=None
) -> tuple[list[int], list[int]]:
    """Validate a slot_attention call; returns host copies of the two offset arrays
    (the caller's `HostSeqs` when given)."""
    require(
        kv_layer.dim() == 4 and kv_layer.shape[1] == 2,
        lambda: f"kv_layer must be [slots, 2, kv_heads, dim], got {tuple(kv_layer.shape)}",
    )
    heads(q, kv_layer[:, 0], kv_layer[:, 1])
    require(slot_ids.dim() == 1 and slot_ids.dtype in INDEX_DTYPES, "slot_ids must be 1-D int32/int64")
    require(slot_ids.device == q.device, "slot_ids must be on q's device")
    cq = host_offsets(cu_seqlens_q, host_q, q.shape[0], "cu_seqlens_q")
    cs = host_offsets(cu_slots, host_slots, slot_ids.shape[0], "cu_slots")
    require(len(cq) == len(cs), lambda: f"cu_seqlens_q has {len(cq) - 1} requests, cu_slots {len(cs) - 1}")
    return cq, cs


def partials(outs, lses) -> None:
    """Validate merge_partials inputs: k >= 1 partials o_i [T, H, D], lse_i [T, H]."""
    require(len(outs) == len(lses) and len(outs) > 0, "need the same number (>= 1) of outs and lses")
    shape = outs[0].shape
    require(len(shape) == 3, lambda: f"o must be [tokens, heads, dim], got {tuple(shape)}")
    for o, lse in zip(outs, lses):
        require(
            o.shape == shape and lse.shape == shape[:2],
            lambda: f"partials disagree: o {tuple(o.shape)} lse {tuple(lse.shape)} vs {tuple(shape)}",
        )
        require(o.device == outs[0].device and lse.device == outs[0].device, "partials on several devices")


def write(kv_layer, slot_ids, k, v) -> None:
    require(
        kv_layer.dim() == 4 and kv_layer.shape[1] == 2,
        lambda: f"kv_layer must be [slots, 2, kv_heads, dim], got {tuple(kv_layer.shape)}",
    )
    require(
        k.shape == v.shape and k.shape[1:] == kv_layer.shape[2:],
        lambda: (
            f"k/v must be [n, {kv_layer.shape[2]}, {kv_layer.shape[3]}], got {tuple(k.shape)}, {tuple(v.shape)}"
        ),
    )
    require(
        slot_ids.shape == (k.shape[0],) and slot_ids.dtype in INDEX_DTYPES,
        lambda: f"slot_ids must be int [n={k.shape[0]}], got {tuple(slot_ids.shape)} {slot_ids.dtype}",
    )
