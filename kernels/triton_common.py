"""What the Triton kernels share: whether Triton can run here, the interpreter switch,
and the base-2 constants (kernels use exp2/log2 inside and convert LSE to natural log at
the boundary, architecture.md §3.1)."""

from __future__ import annotations

import functools
import os

import torch

LOG2E = 1.4426950408889634  # log2(e): scores * scale * LOG2E feed exp2
LN2 = 0.6931471805599453  # ln(2): lse2 * LN2 is the natural-log LSE

HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two the kernels are built for

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton is a Linux-only dependency
    HAVE_TRITON = False


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels then run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuned(configs: list) -> list:
    """An autotuned kernel's configs: all of them, or only the first under
    ESP_TRITON_AUTOTUNE=0 (read when the kernel modules are imported), which then launches
    without timing the others. For correctness runs on a fresh GPU host
    (scripts/gpu_check.sh's tests): autotuning compiles every config of every
    specialisation the tests hit, ~1-6 s each for sm_90 (`compile_check`), which adds up to
    minutes before a single result."""
    return configs if os.environ.get("ESP_TRITON_AUTOTUNE", "1") != "0" else configs[:1]


@functools.cache
def cuda_ok() -> bool:
    return torch.cuda.is_available()


def usable() -> bool:
    """Triton kernels can run in this process (a CUDA device, or the interpreter)."""
    return HAVE_TRITON and (interpreting() or cuda_ok())


def device_ok(t: torch.Tensor) -> bool:
    """The tensors' device is one Triton can launch on here."""
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


@functools.cache
def sm_count(index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # interpreter: any small number shapes the split heuristics alike
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use true fp32 products (tests compare tightly with the reference);
    16-bit inputs ignore this and run on tensor cores with fp32 accumulation."""
    return "ieee" if dtype == torch.float32 else "tf32"
