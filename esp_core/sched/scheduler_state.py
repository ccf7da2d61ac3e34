"""SchedulerState: everything the ESP scheduler keeps between calls.

The planning modules (prefill.py, chunked.py, decode.py) and the completion handling
(completion.py) read and change it; `ESPScheduler` (scheduler.py) owns one. What a
single `schedule()` call accumulates lives in a `PlanBuilder` (builder.py) instead.

Who holds what, per instance `i`: `owner[i]` is the decode group the instance belongs
to (groups own disjoint instance sets), `busy[i]` the running batch on it; the KV slots
themselves are counted by `kv`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from esp_core.sched.admission import PeakMemoryCheck
from esp_core.sched.allocation import GroupView
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.kv_accounting import KVAccounting
from esp_core.sched.plan import ReleaseReason
from esp_core.sched.prefix_cache import PrefixCache
from esp_core.sched.residency import MemoryCheckFactory, ResidentSet
from esp_core.sched.state import DecodeGroup, Phase, RunningBatch, SchedulerRequest, WaitQueue

STAT_NAMES = (
    "preemptions",
    "migrations",
    "scale_ups",
    "pauses",
    "prefill_batches",
    "decode_steps",
    "chunks",
    "budget_chunks",
    "whole_prompt_chunks",
    "decode_merges",
    "decode_narrowings",
    "packed_prefills",
)


@dataclass(frozen=True)
class Algorithms:
    """The pieces of the scheduler with a fast path that has a plain reference version.

    Tests pass the references here (tests/support/sched_reference.py) and check that
    every plan comes out the same; the server always uses the defaults."""

    kv_accounting: type[KVAccounting] = KVAccounting
    memory_check: MemoryCheckFactory = PeakMemoryCheck.deferred


@dataclass
class SchedulerState:
    cluster: ClusterSpec
    cost: CostModel
    config: ESPSchedulerConfig
    algorithms: Algorithms = field(default_factory=Algorithms)

    def __post_init__(self) -> None:
        n = self.cluster.num_instances
        self.tp = self.cluster.tp_per_instance
        self.kv = self.algorithms.kv_accounting(n, self.cluster.kv_slots_per_instance)
        self.requests: dict[str, SchedulerRequest] = {}
        self.queue = WaitQueue()
        self.groups: dict[int, DecodeGroup] = {}
        self.owner: list[int | None] = [None] * n  # decode group owning each instance
        self.busy: list[int | None] = [None] * n  # running batch on each instance
        self.running: dict[int, RunningBatch] = {}
        # finished requests whose KV the next plan releases
        self.pending_release: dict[str, ReleaseReason] = {}
        # finished requests still inside a running batch: released once it completes
        self.release_after_batch: dict[str, ReleaseReason] = {}
        self.residents = ResidentSet(
            self.requests,
            n * self.cluster.kv_slots_per_instance,
            self.algorithms.memory_check,
            self.shared_resident_slots,
        )
        self.decode_steps_since_prefill_check = 0
        self.last_short_arrival = -math.inf  # for short-request isolation
        self.whole_prompts_now = False  # this call: unstarted long prompts go whole
        self.budget_longs: set[str] = set()  # long prompts started on the shorts' instance
        self._ids = itertools.count(1)  # batch and group ids (one sequence)
        self._stripe = itertools.count()
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        # finished requests' KV kept for reuse (None: no prefix cache); its counters are
        # kept apart from `stats` so runs without a cache report exactly what they did
        # (a hit is a chunked prompt whose holders are the entry's, wherever decode groups
        # are: it needs chunked prefill and short_kv_on_long_holders)
        cfg = self.config
        use_cache = cfg.prefix_cache and cfg.chunked_prefill and cfg.short_kv_on_long_holders
        self.prefix_cache = PrefixCache(self.config.prefix_block_tokens) if use_cache else None
        self.cache_stats = {"hits": 0, "hit_tokens": 0, "shared_tokens": 0, "evicted_tokens": 0}
        self.cache_stats["live_hits"] = 0  # hits shared from a running request
        # KV tokens of cache entries per instance, kept as entries come and go (an entry's
        # KV never moves): status and metrics read it every engine step
        self.cached_per_instance = [0] * n
        # waiting requests whose prefix another request computes now: not started cold in
        # this call (cache_ops.hold_for_prefix), they copy it once it is written
        self.held_for_prefix: set[str] = set()

    def shared_resident_slots(self) -> int:
        """Slots of shared segments (prefix-cache KV) that some resident request holds."""
        members = self.residents.members
        return sum(g.end - g.start for g in self.kv.segments() if any(h in members for h in g.holders))

    def own_len(self, st: SchedulerRequest, length: int) -> int:
        """`length` less the positions `st` holds in shared segments (counted apart)."""
        return length - self.kv.segment_len(st.rid)

    def next_id(self) -> int:
        return next(self._ids)

    def next_stripe(self) -> int:
        return next(self._stripe)

    # ------------------------------------------------------------------ instances

    def idle_instances(self) -> list[int]:
        return [i for i, b in enumerate(self.busy) if b is None]

    def needs_chunks(self, st: SchedulerRequest) -> bool:
        """More than one chunk left to prefill (chunked prefill only)."""
        return self.config.chunked_prefill and st.prefill_target - st.prefilled > self.config.chunk_tokens

    def is_short(self, num_prompt_tokens: int) -> bool:
        """A prompt (or what is left of one to prefill) that short-request isolation is
        for: at most `short_prompt_tokens` and at most one chunk."""
        return num_prompt_tokens <= min(self.config.short_prompt_tokens, self.config.chunk_tokens)

    def short_waiting(self) -> bool:
        """A short request waits for its prefill."""
        return any(
            st.phase == Phase.WAITING and self.is_short(st.prefill_target - st.prefilled)
            for st in map(self.requests.__getitem__, self.queue)
        )

    def is_long(self, st: SchedulerRequest) -> bool:
        """A prompt prefilled chunk by chunk (chunked prefill only). Not one that has not
        started while no short request is around (`whole_prompts_without_shorts`): it
        is prefilled whole, as any other prompt (one the chunk path already reserved room
        for stays on that path)."""
        if st.phase == Phase.PARTIAL:
            return self.config.chunked_prefill
        if not self.needs_chunks(st):
            return False
        return not (self.whole_prompts_now and st.prefilled == 0 and not self.kv.reserved(st.rid))

    def update_whole_prompts(self, now: float) -> None:
        """Decide once per `schedule()` call whether unstarted long prompts go whole
        (see `is_long`): so every step of one call sees the same answer."""
        cfg = self.config
        self.whole_prompts_now = (
            cfg.whole_prompts_without_shorts
            and now - self.last_short_arrival > cfg.short_activity_window_s
            and not self.short_waiting()
        )

    def partial_holders(self) -> set[int]:
        """Instances holding KV of chunked requests between chunks (the next chunk needs
        its holders)."""
        if not self.config.chunked_prefill:
            return set()  # (requests are PARTIAL only between chunks)
        out: set[int] = set()
        for rid in self.queue:
            if self.requests[rid].phase == Phase.PARTIAL:
                out.update(self.kv.holders(rid))
        return out

    # ------------------------------------------------------------------ groups

    def group_view(self, g: DecodeGroup) -> GroupView:
        insts = tuple(sorted(g.instances))
        kv_tok = {i: 0 for i in insts}
        for rid in g.requests:
            for i, n in self.kv.placement(rid).items():
                kv_tok[i] += n
        borrowable = g.steps_since_borrow >= self.config.min_decode_steps_between_borrows
        return GroupView(
            g.gid,
            insts,
            len(g.requests),
            tuple(int(self.kv.free[i]) for i in insts),
            tuple(kv_tok[i] for i in insts),
            borrowable,
            not any(self.kv.in_segments(rid) for rid in g.requests),
        )

    def decode_step_estimate(self, g: DecodeGroup) -> float:
        if self.config.constant_decode_time_s is not None:
            return self.config.constant_decode_time_s
        m = max(len(g.instances), 1)
        return self.cost.decode_time(math.ceil(len(g.requests) / m), self.step_kv_max(g), m, self.tp)

    def step_kv_max(self, g: DecodeGroup) -> int:
        """KV tokens a decode step of `g` reads on its busiest instance, shared segments
        once (shared-prefix attention)."""
        return max(self.kv.step_reads(g.requests).values(), default=0)

    def dissolve(self, g: DecodeGroup) -> None:
        for i in g.instances:
            if self.owner[i] == g.gid:
                self.owner[i] = None
        del self.groups[g.gid]

    # ------------------------------------------------------------------ requests

    def forget(self, rid: str) -> None:
        """Drop a finished request whose KV is gone (keeps the state small)."""
        st = self.requests.get(rid)
        if (
            st is not None
            and st.phase == Phase.DONE
            and st.batch is None
            and rid not in self.pending_release
            and rid not in self.release_after_batch
        ):
            del self.requests[rid]
