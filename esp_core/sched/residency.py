"""The requests that hold (or are about to hold) KV, as the admission memory check sees them.

Every resident request contributes `(check_remaining, check_len)` to the peak-memory check
(admission.py). Gathering those arrays costs O(residents) -- thousands at 256 instances --
so the set keeps two aggregates current at every transition and the check gathers the
arrays only when the bound they give is not enough: Σ check_len exactly, and an upper
bound of max check_remaining (tightened whenever the arrays are gathered).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from esp_core.sched.admission import MemoryCheck, PeakMemoryCheck
from esp_core.sched.state import SchedulerRequest

# (load the resident arrays, an upper bound of their peak, capacity) -> a check
MemoryCheckFactory = Callable[[Callable[[], tuple[list[int], list[int]]], int, int], MemoryCheck]


class ResidentSet:
    def __init__(
        self,
        requests: Mapping[str, SchedulerRequest],
        capacity: int,
        check_factory: MemoryCheckFactory = PeakMemoryCheck.deferred,
        shared_slots: Callable[[], int] = lambda: 0,
    ) -> None:
        self._requests = requests
        self._capacity = capacity
        # slots of shared prefix-cache KV that members hold: counted once, outside the
        # members' check_len (a reader's check_len leaves its shared positions out)
        self._shared_slots = shared_slots
        self._check_factory = check_factory
        self.members: dict[str, None] = {}  # ordered set of request ids
        self.total_len = 0  # Σ check_len over members, exact
        self.remaining_upper_bound = 0  # >= max check_remaining over members

    def __contains__(self, rid: object) -> bool:
        return rid in self.members

    def add(self, st: SchedulerRequest) -> None:
        if st.rid not in self.members:
            self.members[st.rid] = None
            self.total_len += st.check_len
            self.remaining_upper_bound = max(self.remaining_upper_bound, st.check_remaining)

    def drop(self, st: SchedulerRequest) -> None:
        if st.rid in self.members:
            del self.members[st.rid]
            self.total_len -= st.check_len

    def set_view(self, st: SchedulerRequest, remaining: int, length: int) -> None:
        """Set what the memory check counts for `st` (kept in the aggregates if resident)."""
        if st.rid in self.members:
            self.total_len += length - st.check_len
            self.remaining_upper_bound = max(self.remaining_upper_bound, remaining)
        st.check_remaining = remaining
        st.check_len = length

    def memory_check(self) -> MemoryCheck:
        """A fresh peak-memory check over the members; the per-request arrays are
        gathered only if a candidate needs the exact peak."""

        def load() -> tuple[list[int], list[int]]:
            states = [self._requests[rid] for rid in self.members]
            remaining = [st.check_remaining for st in states]
            self.remaining_upper_bound = max(remaining, default=0)
            return remaining, [st.check_len for st in states]

        n = len(self.members)
        bound = self.remaining_upper_bound * n + self.total_len if n else 0
        return self._check_factory(load, bound, self._capacity - self._shared_slots())
