"""Host copies of a kernel call's layout, given by the caller so the wrappers never read
device tensors back.

On a GPU every `.tolist()` / `.item()` of a device tensor waits until the device has
finished all queued work. A wrapper needs host ints to size its grid (max sequence
length), choose KV splits, or map a mask onto flash-attn's; the callers already hold
them (a batch's offsets come from the plan's host lists), so they pass them along:

* `HostSeqs(cu, first=None, step=None)`: one side of a varlen call. `cu` is the host copy
  of the offsets tensor [B+1]. With `first` [B] and `step` given, the caller states that
  request b's positions are the progression first[b] + i * step (i < its length):
  contiguous chunks (step 1) and every rank of a striped ring (step = ring size) are.
  The flash adapter maps such a call onto bottom-right causal attention from these ints
  alone; without them it checks the positions on the device (one read).

Without host copies every wrapper still works: it reads the offsets back (`checks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostSeqs:
    """Host layout of one side (queries, keys or slot lists) of a kernel call."""

    cu: tuple[int, ...]  # offsets [B+1], equal to the device tensor's values
    first: tuple[int, ...] | None = None  # position of each request's first token [B]
    step: int | None = None  # every request's positions advance by this much

    @classmethod
    def of(cls, cu: Sequence[int], first: Sequence[int] | None = None, step: int | None = None) -> HostSeqs:
        return cls(tuple(cu), None if first is None else tuple(first), step)

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], first: Sequence[int] | None = None, step: int | None = None
    ) -> HostSeqs:
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        return cls.of(cu, first, step)

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.cu, self.cu[1:])]

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @property
    def progressions(self) -> bool:
        """Positions are known to be per-request arithmetic progressions."""
        return self.first is not None and self.step is not None


def device_ints(
    values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Host ints as a tensor on `device`. To CUDA through pinned memory with
    non_blocking=True: a pageable copy would wait for the stream to drain."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
