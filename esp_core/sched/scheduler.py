"""ESPScheduler: LoongServe's global manager, event-driven (docs/architecture.md).

Per call, `schedule(now)` decides only new work on idle instances, in this order:

1. releases of finished / aborted requests whose instances are idle (completion.py);
   prefix-cache hits adopted and old entries evicted when their KV is needed (cache_ops.py);
2. prefills: long prompts that waited too long first, chunk by chunk (chunked.py), then
   one round for whole prompts -- admission, elastic instance allocation, the batching
   DP, KV placement (prefill.py) -- then the other long prompts' next chunks;
3. the next step of every decode group whose previous step finished (decode.py), and
   with `decode_lookahead` the step after a running one (lookahead.py);
4. what each instance of those batches lacks of their requests: joins (the request sent
   to it) and decode items' output prefixes (joins.py).

`update(result, now)` records one batch's completion (completion.py).

The modules share one `SchedulerState` (scheduler_state.py: what lives between calls);
what one call accumulates is a fresh `PlanBuilder` (builder.py). `check_invariants`
(invariants.py) re-derives the state's consistency; tests run it after every event.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.cache_ops import adopt_hits, cached_tokens_per_instance, evict_for_demand
from esp_core.sched.chunked import claim_holders, try_chunk
from esp_core.sched.completion import apply_result, emit_releases, finish
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.decode import plan_decodes
from esp_core.sched.interface import ClusterSpec, FinishReason, RequestEvent, RequestRejected
from esp_core.sched.invariants import check_invariants
from esp_core.sched.joins import send_what_is_missing
from esp_core.sched.kv_accounting import KVAccounting
from esp_core.sched.lookahead import plan_lookaheads
from esp_core.sched.plan import BatchResult, IterationPlan, NewRequest, ReleaseReason
from esp_core.sched.prefill import plan_round
from esp_core.sched.scheduler_state import Algorithms, SchedulerState
from esp_core.sched.state import DecodeGroup, Phase, RunningBatch, SchedulerRequest


class ESPScheduler:
    def __init__(
        self,
        cluster: ClusterSpec,
        cost_model: CostModel,
        config: ESPSchedulerConfig | None = None,
        algorithms: Algorithms | None = None,
    ) -> None:
        """`algorithms`: tests pass slow reference implementations here."""
        self.cluster = cluster
        self.config = config or ESPSchedulerConfig()
        self.state = SchedulerState(cluster, cost_model, self.config, algorithms or Algorithms())
        self._plan_ids = itertools.count(1)

    # ------------------------------------------------------------------ state seen from outside

    @property
    def cost(self) -> CostModel:
        return self.state.cost

    @cost.setter
    def cost(self, cost_model: CostModel) -> None:  # the same as `set_cost_model`
        self.state.cost = cost_model

    def set_cost_model(self, cost_model: CostModel) -> None:
        """Decide with `cost_model` from the next call on (e.g. refit from live timings)."""
        self.state.cost = cost_model

    @property
    def tp(self) -> int:
        return self.state.tp

    @property
    def kv(self) -> KVAccounting:
        return self.state.kv

    @property
    def requests(self) -> dict[str, SchedulerRequest]:
        return self.state.requests

    @property
    def groups(self) -> dict[int, DecodeGroup]:
        return self.state.groups

    @property
    def busy(self) -> list[int | None]:
        return self.state.busy

    @property
    def running(self) -> dict[int, RunningBatch]:
        return self.state.running

    @property
    def stats(self) -> dict[str, int]:
        return self.state.stats

    def num_waiting(self) -> int:
        """Requests waiting for a prefill or for their next chunk."""
        return len(self.state.queue)

    def kv_free_slots(self) -> list[int]:
        return self.state.kv.free_slots()

    def has_unfinished(self) -> bool:
        s = self.state
        return bool(
            s.queue
            or s.running
            or s.pending_release
            or s.release_after_batch
            or any(g.requests for g in s.groups.values())
        )

    def check_invariants(self) -> None:
        check_invariants(self.state)

    @property
    def prefix_cache_enabled(self) -> bool:
        """Whether finished requests' KV is kept for reuse (requests should carry
        `block_hashes` of `config.prefix_block_tokens`-token blocks)."""
        return self.state.prefix_cache is not None

    def cached_kv_per_instance(self) -> list[int]:
        return cached_tokens_per_instance(self.state)

    def prefix_cache_stats(self) -> dict[str, Any]:
        """The prefix cache for status and metrics: on or off, entries, KV tokens they
        hold per instance, hits and hit tokens so far, tokens evicted."""
        s = self.state
        return {
            "enabled": s.prefix_cache is not None,
            "entries": len(s.prefix_cache) if s.prefix_cache is not None else 0,
            "cached_tokens_per_instance": cached_tokens_per_instance(s),
            **s.cache_stats,
        }

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: NewRequest, now: float) -> None:
        rid = request.request_id
        if rid in self.state.requests:
            raise RequestRejected(f"duplicate request id {rid!r}")
        if request.prompt_len < 1:
            raise RequestRejected("empty prompt")
        if request.sampling.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1")
        need = request.prompt_len + request.sampling.max_tokens
        total = self.cluster.num_instances * self.cluster.kv_slots_per_instance
        limit = min(total, self.config.max_model_len or total)
        if need > limit:
            raise RequestRejected(
                f"prompt ({request.prompt_len}) + max_tokens ({request.sampling.max_tokens}) "
                f"= {need} tokens exceeds the context this group can hold ({limit})",
                code="context_length_exceeded",
            )
        st = SchedulerRequest(req=request, arrival=request.arrival_time or now, wait_since=now)
        if self.state.is_short(request.prompt_len):
            self.state.last_short_arrival = now
        self.state.requests[rid] = st
        self.state.queue.push(st)

    def add_resumed_request(self, request: NewRequest, output_token_ids: Iterable[int], now: float) -> None:
        """A request that already produced `output_token_ids` (streamed to its client) and
        lost its KV (the group was rebuilt after a fault): it waits like a preempted
        request, is re-prefilled over prompt + those outputs (`extra_token_ids`) and
        continues to its original max_tokens. The outputs stay its output history, so
        penalties and (seed, output index) sampling continue as if nothing happened."""
        outputs = [int(t) for t in output_token_ids]
        if len(outputs) >= request.sampling.max_tokens:
            raise RequestRejected(
                f"request {request.request_id!r} already has "
                f"{len(outputs)} of {request.sampling.max_tokens} tokens"
            )
        self.add_request(request, now)
        if outputs:
            st = self.state.requests[request.request_id]
            st.outputs = outputs
            st.prefill_target = st.seq_len
            st.check_remaining = st.remaining

    def output_ids(self, request_id: str) -> list[int] | None:
        st = self.state.requests.get(request_id)
        return None if st is None else list(st.outputs)

    def abort_request(self, request_id: str, now: float) -> list[RequestEvent]:
        st = self.state.requests.get(request_id)
        if st is None or st.phase == Phase.DONE:
            return []
        st.aborted = True
        finish(self.state, st, ReleaseReason.ABORTED)
        return [
            RequestEvent(
                request_id,
                finish_reason=FinishReason.ABORT,
                num_prompt_tokens=st.prompt_len,
                num_output_tokens=len(st.outputs),
            )
        ]

    # ------------------------------------------------------------------ the two calls

    def schedule(self, now: float) -> IterationPlan:
        plan = PlanBuilder(now)
        self.state.update_whole_prompts(now)
        plan.releases.extend(emit_releases(self.state))
        if self.state.prefix_cache is not None:
            read_now = adopt_hits(self.state, plan)
            evict_for_demand(self.state, plan, read_now)
        if self.state.queue:
            self._plan_prefills(plan)
        held = plan_decodes(self.state, plan)
        plan_lookaheads(self.state, plan, held)
        send_what_is_missing(self.state, plan)
        return plan.build(next(self._plan_ids))

    def update(self, result: BatchResult, now: float) -> list[RequestEvent]:
        return apply_result(self.state, result, now)

    def _plan_prefills(self, plan: PlanBuilder) -> None:
        s, cfg = self.state, self.config
        idle = s.idle_instances()
        if not idle:
            return
        if not any(s.owner[i] is None for i in idle):
            # only decode instances between steps: borrowing them is reconsidered every
            # few decode steps, not after each one (LoongServe: every 10)
            if s.decode_steps_since_prefill_check < cfg.prefill_check_interval_steps:
                return
        s.decode_steps_since_prefill_check = 0
        longs = (
            [
                s.requests[rid]
                for rid in s.queue
                if s.is_long(s.requests[rid]) and rid not in s.held_for_prefix
            ]
            if cfg.chunked_prefill
            else []
        )
        aged = [st for st in longs if plan.now - st.wait_since >= cfg.long_request_max_wait_s]
        # long prompts that could not start (KV, instances) and were passed by later
        # ones: bounded skip-ahead as in admission, else a huge prompt waiting for room
        # is passed by smaller ones forever
        unstarted: list[SchedulerRequest] = []
        for st in aged:  # starving chunked requests go before short ones
            try_chunk(s, plan, st, unstarted)
            if st.phase == Phase.PARTIAL:
                claim_holders(s, plan, st)
        plan_round(s, plan)
        aged_ids = {st.rid for st in aged}
        for st in longs:
            if st.rid in aged_ids or st.phase not in (Phase.WAITING, Phase.PARTIAL):
                continue
            if st.phase == Phase.WAITING and not s.kv.holders(st.rid) and not self._free_idle_left(plan):
                continue  # a first chunk needs an idle instance no group owns: none left
            try_chunk(s, plan, st, unstarted)

    def _free_idle_left(self, plan: PlanBuilder) -> bool:
        s = self.state
        return any(b is None and i not in plan.taken and s.owner[i] is None for i, b in enumerate(s.busy))
