"""The walking-skeleton scheduler: every request runs on ONE instance.

It implements the `Scheduler` protocol (interface.py) with the same event-driven shape the
ESP scheduler uses, so the controller and the simulator drive both the same way; only the
placement is trivial (DoP 1 for prefill and decode). The real ESP policy replaces it via
`scheduler.policy` in the app config.

Policy, per call of `schedule(now)`, for every *idle* instance (no batch in flight):
  1. releases: KV of requests that finished or were aborted there is freed first, so the
     same plan can reuse those slots;
  2. admission (FCFS, no skip-ahead): the head of the waiting queue goes to the idle
     instance with the most unreserved KV that fits `prompt + max_tokens` slots and has
     prefill token budget left this round; when it fits nowhere idle right now, admission
     stops (it waits for slots; the order is kept);
  3. each idle instance gets a prefill batch of its newly admitted requests and a decode
     batch of its running requests, in the same plan (run back to back on the instance).
Admission reserves `prompt + max_tokens` slots, so decode can never run out of KV and no
preemption is needed; a request that could never fit one instance is rejected in
`add_request` with code "context_length_exceeded".

`add_resumed_request` takes back a request that already streamed some tokens and lost its
KV (the group was rebuilt after a fault): it is re-prefilled over prompt + those tokens
(`extra_token_ids`), samples its next output, and continues to its max_tokens.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from esp_core.sched.interface import (
    ClusterSpec,
    FinishReason,
    RequestEvent,
    RequestRejected,
)
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    RequestJoin,
    SampledToken,
    TokenRange,
)


@dataclass(frozen=True)
class LocalSchedulerConfig:
    """Limits of the local policy (built from the app's `scheduler` config section)."""

    max_num_batched_tokens: int = 8192  # prefill tokens per instance per round
    max_running_per_instance: int = 256  # requests decoding on one instance
    max_model_len: int | None = None  # prompt + output limit (None: only the KV pool)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_running_per_instance < 1:
            raise ValueError("max_running_per_instance must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")


@dataclass
class _Request:
    new: NewRequest
    instance: int | None = None  # set at admission
    outputs: list[int] = field(default_factory=list)
    in_flight: bool = False  # part of a batch that has not completed yet
    aborted: bool = False
    prefilled: bool = False  # its KV exists (outputs alone do not say so after a resume)

    @property
    def reserve(self) -> int:
        return self.new.prompt_len + self.new.sampling.max_tokens

    @property
    def prefill_len(self) -> int:  # prompt, plus earlier outputs when resumed
        return self.new.prompt_len + len(self.outputs)


@dataclass
class _Inflight:
    kind: str
    instance: int
    request_ids: tuple[str, ...]


class LocalScheduler:
    """Continuous batching with each request pinned to one instance (see module doc)."""

    def __init__(self, cluster: ClusterSpec, config: LocalSchedulerConfig | None = None):
        self.cluster = cluster
        self.config = config or LocalSchedulerConfig()
        n = cluster.num_instances
        self._reserved = [0] * n  # slots promised to admitted requests (incl. unreleased)
        self._inflight_on = [0] * n  # batches in flight per instance
        self._running: list[list[str]] = [[] for _ in range(n)]  # admitted, not finished
        # releases not yet sent, with the slots each frees in the scheduler's accounting
        self._pending_release: list[list[tuple[Release, int]]] = [[] for _ in range(n)]
        self._waiting: deque[str] = deque()
        self._requests: dict[str, _Request] = {}
        self._batches: dict[int, _Inflight] = {}
        self._plan_ids = itertools.count()
        self._batch_ids = itertools.count()
        self._stats = {"prefill_batches": 0, "decode_steps": 0}

    # ------------------------------------------------------------------ requests in/out

    def add_request(self, request: NewRequest, now: float) -> None:
        rid = request.request_id
        if rid in self._requests:
            raise RequestRejected(f"duplicate request id {rid!r}")
        sp = request.sampling
        if request.prompt_len < 1:
            raise RequestRejected("the prompt must contain at least one token")
        if sp.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1")
        total = request.prompt_len + sp.max_tokens
        limit = self.config.max_model_len
        if limit is not None and total > limit:
            raise RequestRejected(
                f"this model's maximum context length is {limit} tokens; the request asks "
                f"for {total} ({request.prompt_len} in the prompt + {sp.max_tokens} "
                "max_tokens): shorten the prompt or reduce max_tokens",
                code="context_length_exceeded",
            )
        if total > self.cluster.kv_slots_per_instance:
            raise RequestRejected(
                f"the request needs {total} KV slots ({request.prompt_len} prompt + "
                f"{sp.max_tokens} max_tokens) but one instance holds only "
                f"{self.cluster.kv_slots_per_instance}: shorten the prompt or reduce "
                "max_tokens",
                code="context_length_exceeded",
            )
        self._requests[rid] = _Request(request)
        self._waiting.append(rid)

    def add_resumed_request(self, request: NewRequest, output_token_ids, now: float) -> None:
        """A request that produced `output_token_ids` before its KV was lost: it waits
        again, then is prefilled over prompt + outputs and continues (outputs stay its
        history: penalties and (seed, output index) sampling continue unchanged)."""
        outputs = [int(t) for t in output_token_ids]
        if len(outputs) >= request.sampling.max_tokens:
            raise RequestRejected(
                f"request {request.request_id!r} already has "
                f"{len(outputs)} of {request.sampling.max_tokens} tokens"
            )
        self.add_request(request, now)
        self._requests[request.request_id].outputs = outputs

    def output_ids(self, request_id: str) -> list[int] | None:
        req = self._requests.get(request_id)
        return None if req is None else list(req.outputs)

    def abort_request(self, request_id: str, now: float) -> list[RequestEvent]:
        req = self._requests.get(request_id)
        if req is None or req.aborted:
            return []
        req.aborted = True
        if req.instance is None:  # still waiting: no KV anywhere
            self._waiting.remove(request_id)
            del self._requests[request_id]
        elif not req.in_flight:  # admitted and idle between steps: release now
            self._finish(req, ReleaseReason.ABORTED)
        # else: its batch is running; `update` drops its token and releases it then
        return [self._event(req, finish_reason=FinishReason.ABORT)]

    # ------------------------------------------------------------------ planning

    def schedule(self, now: float) -> IterationPlan:
        idle = [i for i in range(self.cluster.num_instances) if self._inflight_on[i] == 0]
        releases: list[Release] = []
        for i in idle:
            for rel, slots in self._pending_release[i]:
                self._reserved[i] -= slots
                releases.append(rel)
            self._pending_release[i].clear()

        admitted = self._admit(idle)
        new_requests = tuple(self._requests[rid].new for rids in admitted.values() for rid in rids)
        # a request lives on the instance that admits it: that one joins it, once
        joins = tuple(RequestJoin(rid, (i,)) for i, rids in admitted.items() for rid in rids)

        prefills, decodes = [], []
        for i in idle:
            decoding = [rid for rid in self._running[i] if self._requests[rid].prefilled]
            if decoding:
                decode_items = tuple(self._decode_item(self._requests[rid], i) for rid in decoding)
                decodes.append(DecodeBatch(self._new_batch("decode", i, decoding), (i,), decode_items))
            if admitted.get(i):
                prefill_items = tuple(self._prefill_item(self._requests[rid], i) for rid in admitted[i])
                prefills.append(PrefillBatch(self._new_batch("prefill", i, admitted[i]), (i,), prefill_items))
        return IterationPlan(
            plan_id=next(self._plan_ids),
            new_requests=new_requests,
            prefills=tuple(prefills),
            decodes=tuple(decodes),
            releases=tuple(releases),
            joins=joins,
        )

    def _admit(self, idle: list[int]) -> dict[int, list[str]]:
        """FCFS admission onto idle instances; returns instance -> admitted request ids."""
        budget = {i: self.config.max_num_batched_tokens for i in idle}
        admitted: dict[int, list[str]] = {}
        cap = self.cluster.kv_slots_per_instance
        while self._waiting:
            req = self._requests[self._waiting[0]]
            fits = [
                i
                for i in idle
                if cap - self._reserved[i] >= req.reserve
                and len(self._running[i]) < self.config.max_running_per_instance
                # an over-budget prompt still runs, alone, so it is never starved
                and (budget[i] >= req.prefill_len or not admitted.get(i))
            ]
            if not fits:
                break
            i = max(fits, key=lambda j: (cap - self._reserved[j], -j))
            self._waiting.popleft()
            req.instance = i
            self._reserved[i] += req.reserve
            budget[i] -= req.prefill_len
            self._running[i].append(req.new.request_id)
            admitted.setdefault(i, []).append(req.new.request_id)
        return admitted

    def _new_batch(self, kind: str, instance: int, rids: list[str]) -> int:
        batch_id = next(self._batch_ids)
        self._stats["prefill_batches" if kind == "prefill" else "decode_steps"] += 1
        self._batches[batch_id] = _Inflight(kind, instance, tuple(rids))
        self._inflight_on[instance] += 1
        for rid in rids:
            self._requests[rid].in_flight = True
        return batch_id

    @staticmethod
    def _prefill_item(req: _Request, instance: int) -> PrefillItem:
        # a resumed request re-prefills its earlier outputs too, then samples the next one
        whole = TokenRange(0, req.new.prompt_len + len(req.outputs))
        return PrefillItem(
            req.new.request_id,
            whole,
            stripe_offset=0,
            keep=(KVKeep(instance, (whole,)),),
            extra_token_ids=tuple(req.outputs),
        )

    @staticmethod
    def _decode_item(req: _Request, instance: int) -> DecodeItem:
        # the last sampled token is fed back at its global position
        position = req.new.prompt_len + len(req.outputs) - 1
        return DecodeItem(
            req.new.request_id,
            input_token=req.outputs[-1],
            position=position,
            master=instance,
            holders=(instance,),
            new_kv_instance=instance,
        )

    # ------------------------------------------------------------------ results

    def update(self, result: BatchResult, now: float) -> list[RequestEvent]:
        batch = self._batches.pop(result.batch_id, None)
        if batch is None:
            raise KeyError(f"unknown or already completed batch {result.batch_id}")
        self._inflight_on[batch.instance] -= 1
        sampled: dict[str, SampledToken] = {s.request_id: s for s in result.sampled}
        events: list[RequestEvent] = []
        for rid in batch.request_ids:
            req = self._requests.get(rid)
            if req is None:
                continue
            req.in_flight = False
            if req.aborted:  # abort_request already told the caller
                self._finish(req, ReleaseReason.ABORTED)
                continue
            if result.error is not None or rid not in sampled:
                error = result.error or f"instance {batch.instance} returned no token"
                self._finish(req, ReleaseReason.ABORTED)
                events.append(self._event(req, finish_reason=FinishReason.ERROR, error=error))
                continue
            token = sampled[rid]
            req.prefilled = True
            req.outputs.append(token.token_id)
            reason = self._finish_reason(req, token.token_id)
            if reason is not None:
                self._finish(req, ReleaseReason.FINISHED)
            events.append(self._event(req, token=token, finish_reason=reason))
        return events

    def _finish_reason(self, req: _Request, token_id: int) -> FinishReason | None:
        sp = req.new.sampling
        n = len(req.outputs)
        if n > sp.min_tokens:  # EOS / stop ids only count after min_tokens outputs
            if token_id in sp.stop_token_ids:
                return FinishReason.STOP
            if not sp.ignore_eos and token_id in self.config.eos_token_ids:
                return FinishReason.STOP
        if n >= sp.max_tokens:
            return FinishReason.LENGTH
        limit = self.config.max_model_len
        if limit is not None and req.new.prompt_len + n >= limit:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: _Request, reason: ReleaseReason) -> None:
        """Forget the request and queue the release of its KV on its instance."""
        rid = req.new.request_id
        i = req.instance
        assert i is not None
        self._running[i].remove(rid)
        self._pending_release[i].append((Release(rid, (i,), reason), req.reserve))
        del self._requests[rid]

    @staticmethod
    def _event(
        req: _Request,
        *,
        token: SampledToken | None = None,
        finish_reason: FinishReason | None = None,
        error: str | None = None,
    ) -> RequestEvent:
        return RequestEvent(
            req.new.request_id,
            token=token,
            finish_reason=finish_reason,
            error=error,
            num_prompt_tokens=req.new.prompt_len,
            num_output_tokens=len(req.outputs),
        )

    # ------------------------------------------------------------------ state

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._batches or any(self._pending_release))

    def kv_free_slots(self) -> list[int]:
        return [self.cluster.kv_slots_per_instance - r for r in self._reserved]

    def num_waiting(self) -> int:
        """Requests not yet admitted (the queue the controller bounds)."""
        return len(self._waiting)

    @property
    def stats(self) -> dict[str, int]:
        return self._stats

    @property
    def prefix_cache_enabled(self) -> bool:
        return False  # the local policy keeps no KV after a request

    def cached_kv_per_instance(self) -> list[int]:
        return [0] * self.cluster.num_instances

    def prefix_cache_stats(self) -> dict[str, Any]:
        return {"enabled": False, "entries": 0, "hits": 0, "hit_tokens": 0, "evicted_tokens": 0}

    def set_cost_model(self, cost_model: object) -> None:
        """The local policy decides without a cost model."""

    def check_invariants(self) -> None:
        cap = self.cluster.kv_slots_per_instance
        for i in range(self.cluster.num_instances):
            running = sum(self._requests[rid].reserve for rid in self._running[i])
            pending = sum(slots for _, slots in self._pending_release[i])
            assert self._reserved[i] == running + pending, f"instance {i}: reserved {self._reserved[i]}"
            assert 0 <= self._reserved[i] <= cap, f"instance {i} over-committed: {self._reserved[i]}"
            in_flight = sum(1 for b in self._batches.values() if b.instance == i)
            assert self._inflight_on[i] == in_flight, f"instance {i}: {self._inflight_on[i]} != {in_flight}"
            for rid in self._running[i]:
                assert self._requests[rid].instance == i, rid
        for rid in self._waiting:
            assert self._requests[rid].instance is None, f"{rid} waiting but admitted"

    def is_idle(self, instance: int) -> bool:
        return self._inflight_on[instance] == 0
