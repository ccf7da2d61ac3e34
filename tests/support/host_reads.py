"""Count reads of tensor values back to the host (tests only).

On a GPU every `.item()`, `int(t)`, `bool(t)`, `.tolist()` or `.cpu()` of a device tensor
waits until the device has finished all queued work. On CPU the same calls happen, they
just do not stall, so counting them on CPU finds the reads a GPU step would pay for.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
# Where reads are expected: sampling (the sampled tokens are a step's result and must reach
# the host) and the torch attention engine, the CPU path: it plans its tiles from the
# positions and from index tensors it builds on the host (no wait on a CPU). The other
# kernel wrappers (api, checks, Triton, flash adapter) take host layouts from the caller.
ALLOWED = ("esp_core/runtime/sampling.py", "/kernels/reference.py")
WATCHED = ("/esp_core/", "/app/", "/kernels/")


@contextmanager
def host_reads() -> Iterator[Counter]:
    """Count reads made from the project's code (outside `ALLOWED`), by "name at file:line"."""
    seen: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            where = Path(frame.f_code.co_filename).as_posix()
            counted = any(w in where for w in WATCHED) and "/tests/" not in where  # stand-ins read freely
            if counted and not any(a in where for a in ALLOWED):
                seen[f"{name} at {where}:{frame.f_lineno}"] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def describe(reads: Counter | dict) -> str:
    return "\n".join(f"{n} x {where}" for where, n in sorted(reads.items()))
