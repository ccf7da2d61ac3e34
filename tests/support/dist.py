"""A persistent group of worker processes joined by torch.distributed, for tests and
benchmarks of multi-instance execution without Ray.

Starting a torch process costs ~2.5 s of CPU here, so a group is started once (per test
module or session) and then driven by commands: `group.run(fn, *args)` pickles a
module-level function and its arguments to every rank, runs `fn(ctx, *args)` there and
returns the per-rank results. `ctx.state` is a dict that survives between commands (a
rank's model, pool, worker...).

Failure policy: never hang. Every wait has a deadline; the first rank that raises (or
dies) fails the call at once with its traceback, and the group is torn down and lazily
restarted by the next `run`, because the surviving ranks may be stuck in a transfer with
the failed one (gloo only notices after its own timeout).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised, died or timed out while running a command."""


@dataclass
class RankContext:
    """What a command sees on its rank."""

    rank: int
    world_size: int
    backend: str
    timeout_s: float
    state: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    commands,
    results,
    parent_pid: int,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        results.put((rank, "ready", None))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        return
    ctx = RankContext(rank, world_size, backend, timeout_s)
    while True:
        try:
            msg = commands.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the test process died: do not linger
                break
            continue
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            results.put((rank, "ok", fn(ctx, *args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class DistGroup:
    """`world_size` spawned processes in one gloo (or nccl) world group on 127.0.0.1."""

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 30.0,
        threads_per_rank: int = 1,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self.threads_per_rank = threads_per_rank
        self.start_timeout_s = start_timeout_s
        self._procs: list = []
        self._commands: list = []
        self._results = None

    # ---------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        if self.started:
            return
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        port = free_port()
        for rank in range(self.world_size):
            cmd_q = ctx.Queue()
            proc = ctx.Process(
                target=_worker_main,
                daemon=True,
                args=(
                    rank,
                    self.world_size,
                    port,
                    self.backend,
                    self.timeout_s,
                    self.threads_per_rank,
                    cmd_q,
                    self._results,
                    os.getpid(),
                ),
            )
            proc.start()
            self._procs.append(proc)
            self._commands.append(cmd_q)
        try:
            self._collect("ready", self.start_timeout_s, "start")
        except Exception:
            self.close()
            raise

    def run(
        self,
        fn: Callable,
        *args: Any,
        timeout_s: float = 60.0,
        rank_args: Sequence[tuple] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run `fn(ctx, *args, **kwargs)` on every rank (or `fn(ctx, *rank_args[r])`).

        Returns the results in rank order. Raises RankFailed on the first rank error,
        death or the deadline, after tearing the group down.
        """
        self.start()
        for rank, cmd_q in enumerate(self._commands):
            a = tuple(rank_args[rank]) if rank_args is not None else args
            cmd_q.put((fn, a, kwargs))
        try:
            return self._collect("ok", timeout_s, getattr(fn, "__name__", str(fn)))
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Stop every rank (politely, then by force). Safe to call twice."""
        for cmd_q, proc in zip(self._commands, self._procs):
            if proc.is_alive():
                try:
                    cmd_q.put(None)
                except Exception:
                    pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self._procs, self._commands, self._results = [], [], None

    def __enter__(self) -> DistGroup:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------
    def _collect(self, expected: str, timeout_s: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        out: dict[int, Any] = {}
        while len(out) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in out]
                if dead:
                    raise RankFailed(  # noqa: B904 -- the empty queue is not the cause
                        f"{what}: rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})"
                    )
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(out))
                    raise RankFailed(  # noqa: B904 -- the empty queue is not the cause
                        f"{what}: rank(s) {missing} did not answer within {timeout_s:.0f} s"
                    )
                continue
            if status == "error":
                raise RankFailed(f"{what}: rank {rank} raised:\n{payload}")
            assert status == expected, (status, expected)
            out[rank] = payload
        return [out[r] for r in range(self.world_size)]
