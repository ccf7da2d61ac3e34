"""PlanBuilder: what one `schedule()` call accumulates, created fresh for every call.

The planning steps (prefill.py, chunked.py, decode.py) append to it; `build` freezes it
into the `IterationPlan` the executor runs. Nothing in it outlives the call, so no
per-call scratch is ever left on the scheduler between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from esp_core.sched.plan import (
    DecodeBatch,
    IterationPlan,
    KVAdoption,
    Migration,
    NewRequest,
    PrefillBatch,
    Release,
    RequestJoin,
)
from esp_core.sched.scheduler_state import SchedulerState


@dataclass
class PlanBuilder:
    now: float
    releases: list[Release] = field(default_factory=list)
    adoptions: list[KVAdoption] = field(default_factory=list)  # prefix-cache hits, after releases
    new_requests: list[NewRequest] = field(default_factory=list)  # requests some instance joins
    joins: list[RequestJoin] = field(default_factory=list)  # who gets which (joins.py)
    migrations: list[Migration] = field(default_factory=list)  # run before every batch of the plan
    prefills: list[PrefillBatch] = field(default_factory=list)
    decodes: list[DecodeBatch] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)  # decoding requests paused by a prefill
    # instances given work in this plan, or kept idle for an aged chunked request
    taken: set[int] = field(default_factory=set)
    # holders an aged chunked request waits for: their decode groups do not step again
    drained_for_chunk: set[int] = field(default_factory=set)
    # live requests whose KV a share of this plan reads (cache_ops.py): not to be preempted
    # by it, since a plan's releases run before its adoptions
    share_sources: set[str] = field(default_factory=set)
    _partial_holders: set[int] | None = None

    def partial_holders(self, state: SchedulerState) -> set[int]:
        """`state.partial_holders()`, computed once per call (a fresh copy each time).
        Requests become PARTIAL only in `update`, so within a call the set can only
        shrink (a chunk planned now), and every use treats a holder just planned as
        taken anyway."""
        if self._partial_holders is None:
            self._partial_holders = state.partial_holders()
        return set(self._partial_holders)

    def migrating(self) -> set[int]:
        """Instances a migration of this plan sends KV from or to."""
        return {i for m in self.migrations for i in (m.src, m.dst)}

    def build(self, plan_id: int) -> IterationPlan:
        return IterationPlan(
            plan_id=plan_id,
            new_requests=tuple(self.new_requests),
            prefills=tuple(self.prefills),
            decodes=tuple(self.decodes),
            migrations=tuple(self.migrations),
            releases=tuple(self.releases),
            paused=tuple(self.paused),
            adoptions=tuple(self.adoptions),
            joins=tuple(self.joins),
        )
