"""The scheduler's interface: what the controller and the simulator call.

One engine step, the same in the live server and the simulator::

    plan = scheduler.schedule(now)          # decide new work on idle instances
    results = executor.execute(plan)        # live instances, or the cost-model clock
    for result in results:                  # completion events, possibly later
        events = scheduler.update(result, now)

`schedule` never blocks and never re-plans running work; `update` takes one batch's
completion and returns what happened to requests (tokens, finishes), which the caller
streams to clients. `Scheduler` below is the whole contract. Requests enter with `add_request` and may leave with
`abort_request` (client disconnect, stop string seen by the ingress).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from esp_core.sched.plan import BatchResult, IterationPlan, NewRequest, SampledToken

if TYPE_CHECKING:
    from esp_core.sched.cost_model import CostModel


@dataclass(frozen=True)
class ClusterSpec:
    """The ESP group as the scheduler sees it: N instances and their KV capacities."""

    num_instances: int
    kv_slots_per_instance: int
    tp_per_instance: int = 1

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        if self.kv_slots_per_instance < 1:
            raise ValueError("kv_slots_per_instance must be >= 1")


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop token id (stop strings are the ingress's job)
    LENGTH = "length"  # max_tokens reached, or the context is full
    ABORT = "abort"  # aborted by the client or by a failure
    ERROR = "error"  # the batch failed; the request cannot continue


@dataclass(frozen=True)
class RequestEvent:
    """What `update` tells the caller about one request after one batch completed."""

    request_id: str
    token: SampledToken | None = None  # the new output token, if one was produced
    finish_reason: FinishReason | None = None  # set when the request is done
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # prompt tokens whose KV came from the prefix cache (left out of repr: events of runs
    # without a cache print as before)
    num_cached_tokens: int = field(default=0, repr=False)


class RequestRejected(ValueError):
    """`add_request` refused a request that can never run (e.g. longer than the pool)."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@runtime_checkable
class Scheduler(Protocol):
    """Everything the controller (app/controller.py) and the simulator (esp_core/sim) use
    of a scheduler. Implemented by `ESPScheduler` (scheduler.py) and `LocalScheduler`
    (local.py); the simulator's baselines implement the same calls."""

    cluster: ClusterSpec

    def add_request(self, request: NewRequest, now: float) -> None:
        """Queue a request. Raises RequestRejected if it can never fit."""

    def add_resumed_request(self, request: NewRequest, output_token_ids: Iterable[int], now: float) -> None:
        """Queue a request that already streamed `output_token_ids` and lost its KV (its
        group was rebuilt): it is re-prefilled over prompt + those outputs and continues
        to its max_tokens. Raises RequestRejected if it has nothing left to produce."""

    def output_ids(self, request_id: str) -> list[int] | None:
        """The outputs so far of a request it still keeps (None: it keeps no such
        request); the controller resumes a request over them when its group is rebuilt."""

    def abort_request(self, request_id: str, now: float) -> list[RequestEvent]:
        """Drop a request wherever it is; its KV is released by the next plan."""

    def schedule(self, now: float) -> IterationPlan:
        """New work to start now on idle instances (possibly an empty plan)."""

    def update(self, result: BatchResult, now: float) -> list[RequestEvent]:
        """Record one batch's completion; returns per-request events."""

    def has_unfinished(self) -> bool:
        """True while any request is waiting, running or has a release pending."""

    def num_waiting(self) -> int:
        """Requests queued and not yet (fully) prefilled."""

    def kv_free_slots(self) -> list[int]:
        """The scheduler's view of free KV slots per instance."""

    @property
    def stats(self) -> dict[str, int]:
        """Counters of what the scheduler decided (batches, preemptions, ...)."""

    @property
    def prefix_cache_enabled(self) -> bool:
        """Whether finished requests' KV is kept for reuse (requests then carry block hashes)."""

    def cached_kv_per_instance(self) -> list[int]:
        """KV slots per instance held by prefix-cache entries (evictable: free for admission)."""

    def prefix_cache_stats(self) -> dict[str, Any]:
        """The prefix cache for status: enabled, entries, hits, hit and evicted tokens."""

    def set_cost_model(self, cost_model: CostModel) -> None:
        """Decide with `cost_model` from the next call on (a policy without a cost
        model ignores it)."""

    def check_invariants(self) -> None:
        """Assert the internal state is consistent (tests call it after every event)."""
