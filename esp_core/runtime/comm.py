"""Point-to-point communication between the elastic instances of one ESP group.

Why point-to-point on ONE world group: a batch runs on an arbitrary, per-iteration subset
of instances, and gloo/NCCL subgroups must be created collectively in the same order by
every rank (environment-notes: member-only creation hangs), so per-subset groups are out.
P2P on the world group needs no subgroup at all: each batch's ranks simply talk to each
other while instances of other batches talk among themselves.

Rank layout (`RankLayout`): global rank = instance * tp_size + tp_rank. With tensor
parallelism inside an instance, TP rank t of instance i only ever exchanges with TP rank t
of instance j (each holds the same head shard), so every message here goes to
`layout.global_rank(peer_instance, self.tp_rank)` (the rank's "ESP plane"; the sharding
itself is esp_core/runtime/tensor_parallel.py).

Transfers are batched (`dist.batch_isend_irecv`): a caller lists every send and receive of
one phase, starts them together (so no pair of ranks can deadlock on ordering), overlaps
compute, then waits with an explicit timeout. Sizes come from the plan on both sides in
every path (the plan is deterministic on all instances; a migration's ranges say what it
moves), so no message carries a size and no rank reads one back from a tensor.

gloo does not send CUDA tensors, so with gloo and CUDA tensors the data is staged through
host memory (the single-GPU test mode, architecture.md §6). NCCL needs no staging.

Failure: a rank whose part of a multi-instance batch fails calls `abort()`. Its peers may
be blocked on a receive from it that will never come; destroying the process group on the
failing rank closes its gloo connections, so every such receive fails at once ("Connection
closed by peer") instead of after the transfer timeout, and the failure cascades around a
ring. (Measured: destroying the group from another thread of the *waiting* rank does not
unblock its wait; closing the peer's side does.) The controller then re-forms the group.
With NCCL the peers still wait for the NCCL timeout/watchdog: not covered yet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class CommError(RuntimeError):
    """A transfer failed or timed out (a peer died, or a plan mismatch left a rank waiting)."""


@dataclass(frozen=True)
class RankLayout:
    """Map (instance, tp_rank) to a global rank of the world group."""

    num_instances: int
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.num_instances < 1 or self.tp_size < 1:
            raise ValueError(f"invalid RankLayout({self.num_instances}, {self.tp_size})")

    @property
    def world_size(self) -> int:
        return self.num_instances * self.tp_size

    def global_rank(self, instance: int, tp_rank: int = 0) -> int:
        if not (0 <= instance < self.num_instances and 0 <= tp_rank < self.tp_size):
            raise ValueError(f"instance {instance} / tp_rank {tp_rank} outside {self}")
        return instance * self.tp_size + tp_rank

    def instance_of(self, global_rank: int) -> tuple[int, int]:
        """Inverse of `global_rank`: (instance, tp_rank)."""
        return divmod(global_rank, self.tp_size)


@dataclass
class CommStats:
    """What this rank spent on communication (for benchmarks; never asserted in tests)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    wait_s: float = 0.0  # time blocked in wait(): the communication NOT hidden by compute

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.messages = 0
        self.wait_s = 0.0


@dataclass
class PendingTransfer:
    """Transfers in flight; `wait()` blocks until all are done (or raises CommError)."""

    comm: P2PComm
    works: list = field(default_factory=list)
    # (device tensor to fill, host staging buffer) pairs copied back after the wait
    unstage: list = field(default_factory=list)
    peers: tuple[int, ...] = ()
    done: bool = False

    def wait(self) -> None:
        if self.done:
            return
        t0 = time.perf_counter()
        timeout = timedelta(seconds=self.comm.timeout_s)
        try:
            for work in self.works:
                work.wait(timeout)
        except Exception as exc:  # gloo raises RuntimeError subclasses with peer details
            raise CommError(
                f"instance {self.comm.instance}: transfer with instances {list(self.peers)} failed: {exc}"
            ) from exc
        for dst, host in self.unstage:
            dst.copy_(host)
        self.done = True
        self.comm.stats.wait_s += time.perf_counter() - t0


class P2PComm:
    """This instance's endpoint for P2P with the other instances of the ESP group.

    Messages address instances (not global ranks); the layout maps them. A send to or a
    receive from this very instance is a local copy, so callers need not special-case
    rings of one or a master that is also a holder.
    """

    def __init__(
        self,
        instance: int,
        layout: RankLayout,
        tp_rank: int = 0,
        group: dist.ProcessGroup | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.instance = instance
        self.layout = layout
        self.tp_rank = tp_rank
        self.group = group
        self.timeout_s = timeout_s
        self.stats = CommStats()
        self.aborted: str | None = None  # why this endpoint gave up its group
        self._gloo = dist.is_initialized() and dist.get_backend(group) == "gloo"
        if dist.is_initialized() and dist.get_world_size(group) != layout.world_size:
            raise ValueError(
                f"process group has {dist.get_world_size(group)} ranks but "
                f"the layout needs {layout.world_size}"
            )

    @classmethod
    def from_world(cls, tp_size: int = 1, timeout_s: float = 60.0) -> P2PComm:
        """The endpoint of this process in the initialised default group."""
        layout = RankLayout(dist.get_world_size() // tp_size, tp_size)
        instance, tp_rank = layout.instance_of(dist.get_rank())
        return cls(instance, layout, tp_rank, None, timeout_s)

    def peer_rank(self, instance: int) -> int:
        return self.layout.global_rank(instance, self.tp_rank)

    # ---------------------------------------------------------------------------------
    def start(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
        tag: int = 0,
    ) -> PendingTransfer:
        """Start every send (instance, tensor) and receive (instance, buffer) at once.

        Receive buffers must have exactly the sender's shape and dtype (both sides derive
        sizes from the plan). Several messages between the same pair in one call are
        matched in list order. Empty tensors are skipped (both sides skip them alike).
        """
        if self.aborted is not None:
            raise CommError(
                f"instance {self.instance}: the group was aborted "
                f"({self.aborted}); waiting for it to be re-formed"
            )
        pending = PendingTransfer(self)
        ops: list[dist.P2POp] = []
        self_sends = [t for inst, t in sends if inst == self.instance and t.numel() > 0]
        self_recvs = [t for inst, t in recvs if inst == self.instance and t.numel() > 0]
        if len(self_sends) != len(self_recvs):
            raise ValueError("sends to self and receives from self do not pair up")
        for src, dst in zip(self_sends, self_recvs):
            dst.copy_(src)  # a message to oneself is a local copy
        peers = set()
        for inst, tensor in sends:
            if inst == self.instance or tensor.numel() == 0:
                continue
            buf = self._send_buffer(tensor)
            ops.append(dist.P2POp(dist.isend, buf, self.peer_rank(inst), self.group, tag))
            self.stats.bytes_sent += buf.numel() * buf.element_size()
            peers.add(inst)
        for inst, tensor in recvs:
            if inst == self.instance or tensor.numel() == 0:
                continue
            buf = self._recv_buffer(tensor, pending)
            ops.append(dist.P2POp(dist.irecv, buf, self.peer_rank(inst), self.group, tag))
            self.stats.bytes_received += buf.numel() * buf.element_size()
            peers.add(inst)
        self.stats.messages += len(ops)
        pending.peers = tuple(sorted(peers))
        if ops:
            try:
                pending.works = dist.batch_isend_irecv(ops)
            except Exception as exc:
                raise CommError(
                    f"instance {self.instance}: could not start transfer with {sorted(peers)}: {exc}"
                ) from exc
        return pending

    def abort(self, reason: str) -> None:
        """Give up the process group after a failed multi-instance batch, so that peers
        blocked on a transfer with this instance fail now rather than at the timeout (see
        the module docstring). Every later transfer raises CommError until a new group is
        joined (a new P2PComm)."""
        if self.aborted is not None:
            return
        self.aborted = reason
        if dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except Exception:  # a group broken by a dead peer may not shut down cleanly
                pass

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
        tag: int = 0,
    ) -> None:
        """`start` then `wait`."""
        self.start(sends, recvs, tag).wait()

    def ring_shift(
        self, ring: Sequence[int], send: torch.Tensor, recv: torch.Tensor, tag: int = 0
    ) -> PendingTransfer:
        """Send `send` to the next instance of `ring` and receive `recv` from the previous
        one (logical rank r -> r+1 mod P). This instance must be in the ring."""
        r = list(ring).index(self.instance)
        nxt, prv = ring[(r + 1) % len(ring)], ring[(r - 1) % len(ring)]
        return self.start([(nxt, send)], [(prv, recv)], tag)

    # ---------------------------------------------------------------------------------
    def _send_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        if self._gloo and tensor.is_cuda:
            tensor = tensor.cpu()  # gloo sends host memory only
        return tensor

    def _recv_buffer(self, tensor: torch.Tensor, pending: PendingTransfer) -> torch.Tensor:
        if self._gloo and tensor.is_cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype)
            pending.unstage.append((tensor, host))
            return host
        if not tensor.is_contiguous():
            raise ValueError("receive buffers must be contiguous")
        return tensor
