"""Mutable bookkeeping of the scheduler: requests, decode groups, running batches.

Lifecycle of a request (positions: prompt first, then outputs)::

    WAITING --prefill (or a chunk) planned--> PREFILLING --chunk done--> PARTIAL --...
        ^                                          |  sample=True done
        |  preempted (KV dropped)                  v
        +------------------------------------- DECODE (in a DecodeGroup; stepping,
                                                 ready, or paused while its instances
                                                 run a prefill)  --finish--> done

A request in DECODE with k outputs holds KV for positions [0, prompt + k - 1): the last
output is the next step's input. A preempted request is re-prefilled over prompt + all
k outputs with `sample=True`, which yields output k + 1.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from esp_core.sched.plan import NewRequest


class Phase(str, Enum):
    WAITING = "waiting"  # nothing (or, chunked, nothing yet) planned
    PREFILLING = "prefilling"  # a prefill batch with (a chunk of) it is running
    PARTIAL = "partial"  # chunked: some chunks cached, next chunk not planned yet
    DECODE = "decode"  # member of a decode group
    DONE = "done"


@dataclass
class SchedulerRequest:
    """The scheduler's record of one request: where it is in its lifecycle, how much of
    it is prefilled, its outputs so far (the instances keep their own per-request state,
    esp_core/runtime/request_state.py)."""

    req: NewRequest
    arrival: float
    outputs: list[int] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    sent: bool = False  # prompt ids already shipped in a plan's new_requests
    # instance -> outputs it has recorded, for every instance that has the request's state
    # (joins.py: what a plan must send it)
    known: dict[int, int] = field(default_factory=dict)
    prefill_target: int = 0  # sequence length the current (re)prefill covers
    prefilled: int = 0  # positions of prefill_target whose KV exists or is being computed
    group: int | None = None
    batch: int | None = None  # running batch that contains it (the later one of two)
    # with a decode look-ahead: the earlier of two running steps that contain it
    earlier_batch: int | None = None
    times_passed: int = 0  # skip-ahead count while blocked at the queue
    aborted: bool = False
    preemptions: int = 0
    wait_since: float = 0.0  # when it last became WAITING/PARTIAL (for aging)
    # the memory check's view, kept current at every transition (cheap to gather):
    check_remaining: int = 0  # output budget left
    check_len: int = 0  # KV length it holds or will hold once running work completes
    cached_tokens: int = 0  # prompt positions adopted from the prefix cache (not computed)
    cache_missed_at: int = -1  # the prefix cache's insert count when its lookup last missed

    # copies of `req`'s (which never changes): plain attributes, not properties, since a
    # prefill round reads them several times per request it scans or admits
    rid: str = field(init=False, repr=False, compare=False)
    prompt_len: int = field(init=False, repr=False, compare=False)
    max_tokens: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rid = self.req.request_id
        self.prompt_len = self.req.prompt_len
        self.max_tokens = self.req.sampling.max_tokens
        if not self.prefill_target:
            self.prefill_target = self.req.prompt_len

    @property
    def remaining(self) -> int:
        """Output tokens it may still produce (the memory check's `remaining`)."""
        return max(self.max_tokens - len(self.outputs), 0)

    @property
    def seq_len(self) -> int:
        """Prompt plus outputs so far."""
        return self.prompt_len + len(self.outputs)

    @property
    def kv_len(self) -> int:
        """Positions whose KV exists once running work completes."""
        if self.phase == Phase.DECODE:
            return self.seq_len - 1
        return self.prefilled

    def extra_token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """Ids of positions [start, end) past the prompt (re-prefill of outputs)."""
        if not self.outputs:
            return ()
        lo = max(start, self.prompt_len) - self.prompt_len
        hi = max(end, self.prompt_len) - self.prompt_len
        return tuple(self.outputs[lo:hi])


@dataclass
class DecodeGroup:
    """Requests decoding together on instance list `instances` (owned exclusively)."""

    gid: int
    instances: set[int]
    requests: dict[str, None] = field(default_factory=dict)  # ordered set
    running_batch: int | None = None  # its running step (the later one of two)
    # with a decode look-ahead (lookahead.py): the step still running before `running_batch`
    earlier_batch: int | None = None
    paused_by: set[int] = field(default_factory=set)  # prefill batch ids it waits for
    steps_since_borrow: int = 0

    @property
    def ready(self) -> bool:
        return self.running_batch is None and not self.paused_by


@dataclass
class RunningBatch:
    batch_id: int
    kind: str  # "prefill" | "decode"
    instances: tuple[int, ...]
    requests: tuple[str, ...]
    started: float
    est_end: float
    # prefill only
    sample: dict[str, bool] = field(default_factory=dict)
    borrowed_groups: tuple[int, ...] = ()
    chunk: bool = False  # a chunk of a long (chunked) prompt
    # decode only
    group: int | None = None


class WaitQueue:
    """Requests waiting for a prefill or for their next chunk, in arrival order (ties
    broken by the order they were queued). Removal is O(log n) by a kept sort key."""

    def __init__(self) -> None:
        self._entries: list[tuple[float, int, str]] = []  # (arrival, seq, rid), sorted
        self._key_of: dict[str, tuple[float, int, str]] = {}
        self._seq = itertools.count()

    def push(self, st: SchedulerRequest) -> None:
        key = (st.arrival, next(self._seq), st.rid)
        self._key_of[st.rid] = key
        bisect.insort(self._entries, key)

    def remove(self, st: SchedulerRequest) -> None:
        key = self._key_of.pop(st.rid, None)
        if key is not None:
            idx = bisect.bisect_left(self._entries, key)
            assert self._entries[idx] == key
            del self._entries[idx]

    def __iter__(self) -> Iterator[str]:
        return (rid for _, _, rid in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rid: object) -> bool:
        return rid in self._key_of
