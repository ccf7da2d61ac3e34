"""Bookkeeping shared by the baseline schedulers: requests, finishes, releases, plans.

Each baseline is a `Scheduler` (esp_core/sched/interface.py) that emits ordinary
`IterationPlan`s, so the simulator runs it exactly like the ESP scheduler. This module
holds what all of them do the same way: per-request state and token history, finish
rules (max_tokens, EOS unless ignore_eos, stop ids after min_tokens), queued KV releases,
per-instance busy tracking and plan assembly. The policies live in the sibling modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from esp_core.sched.interface import ClusterSpec, FinishReason, RequestEvent, RequestRejected
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    Migration,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    TokenRange,
)


class Phase(str, Enum):
    WAITING = "waiting"  # queued for (re-)prefill
    PREFILLING = "prefilling"  # some chunks done (chunked prefill)
    READY = "ready"  # prefilled, KV waiting to move to a decode instance (pd-disagg)
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass
class Req:
    new: NewRequest
    order: int  # arrival order (FCFS and preemption priority)
    phase: Phase = Phase.WAITING
    outputs: list[int] = field(default_factory=list)
    prefilled: int = 0  # positions whose KV exists (chunk progress)
    kv: dict[int, int] = field(default_factory=dict)  # instance -> KV tokens (exact)
    alloc: dict[int, int] = field(default_factory=dict)  # instance -> slots allocated
    group: int = 0  # which replica / group serves it
    sent: bool = False  # NewRequest already shipped in a plan
    in_flight: bool = False

    @property
    def rid(self) -> str:
        return self.new.request_id

    @property
    def prompt_len(self) -> int:
        return self.new.prompt_len

    @property
    def max_tokens(self) -> int:
        return self.new.sampling.max_tokens

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.outputs)

    @property
    def prefill_target(self) -> int:
        """Positions a (re-)prefill must cover: the prompt, plus every output already
        sampled when the request was preempted (recomputation)."""
        return self.prompt_len + len(self.outputs)

    @property
    def kv_tokens(self) -> int:
        return sum(self.kv.values())

    def holders(self) -> tuple[int, ...]:
        return tuple(sorted(i for i, n in self.kv.items() if n > 0))


def water_fill(free: list[int], n: int) -> list[int]:
    """Split n tokens over instances with `free` slots each so that the fullest instance
    after placement is as empty as possible (balances decode KV reads). Requires
    n <= sum(free)."""
    if n > sum(free):
        raise ValueError("does not fit")
    k = len(free)
    # Find the largest level L (free slots left on every instance) with
    # sum(max(0, free_i - L)) >= n, then take free_i - L from each, fixing rounding.
    lo, hi = 0, max(free)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(max(0, f - mid) for f in free) >= n:
            lo = mid
        else:
            hi = mid - 1
    take = [max(0, f - lo) for f in free]
    extra = sum(take) - n
    # Over by `extra`: give some back, from the instances that took most.
    for i in sorted(range(k), key=lambda i: -take[i]):
        if extra == 0:
            break
        give = min(extra, take[i])
        take[i] -= give
        extra -= give
    return take


def peak_fits(entries: list[tuple[int, int]], capacity: int) -> bool:
    """LightLLM's / LoongServe's peak-memory check (architecture.md §4, Dispatching): entries are
    (current KV tokens, remaining output tokens); sorted by remaining descending and
    indexed i = 1..n, require max_i(remaining_i * i + sum_{j<=i} current_j) <= capacity,
    the peak KV if every request runs to its budget."""
    entries = sorted(entries, key=lambda e: -e[1])
    cum = 0
    for i, (cur, rem) in enumerate(entries, 1):
        cum += cur
        if rem * i + cum > capacity:
            return False
    return True


class BaselineBase:
    """Request state, update() and plan assembly; subclasses implement `_plan(now)`."""

    #: SplitFuse policies run a prefill chunk and the decode step of the same instances
    #: as one fused forward; the simulator charges them together.
    fused_prefill_decode = False
    #: DistServe-style KV transfer pulled by the decode instance: the simulator does not
    #: block the (prefill) source instance for it.
    migrations_pull_only = False

    def __init__(self, cluster: ClusterSpec, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.cluster = cluster
        self.eos_token_ids = tuple(eos_token_ids)
        self.reqs: dict[str, Req] = {}
        self._order = 0
        self._busy = [0] * cluster.num_instances  # running batches per instance
        self._used = [0] * cluster.num_instances  # allocated slots per instance
        self._releases: list[Release] = []
        self._batches: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._next_batch = 0
        self._next_plan = 0
        self._live = 0  # requests not finished

    # -- Scheduler protocol ------------------------------------------------------------

    def add_request(self, request: NewRequest, now: float) -> None:
        if request.request_id in self.reqs:
            raise RequestRejected(f"duplicate request id {request.request_id}")
        if request.sampling.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1")
        reason = self._never_fits(request)
        if reason:
            raise RequestRejected(reason, code="context_length_exceeded")
        req = Req(request, self._order)
        self._order += 1
        self.reqs[request.request_id] = req
        self._live += 1
        self._enqueue(req)

    def abort_request(self, request_id: str, now: float) -> list[RequestEvent]:
        req = self.reqs.get(request_id)
        if req is None or req.phase == Phase.FINISHED:
            return []
        self._dequeue(req)
        self._finish(req, FinishReason.ABORT)
        return [
            RequestEvent(
                request_id,
                finish_reason=FinishReason.ABORT,
                num_prompt_tokens=req.prompt_len,
                num_output_tokens=len(req.outputs),
            )
        ]

    def schedule(self, now: float) -> IterationPlan:
        return self._plan(now)

    def update(self, result: BatchResult, now: float) -> list[RequestEvent]:
        kind, rids = self._batches.pop(result.batch_id)
        for i in result.instances:
            self._busy[i] -= 1
        for rid in rids:
            self.reqs[rid].in_flight = False
        if result.error:
            events = []
            for rid in rids:
                req = self.reqs[rid]
                if req.phase != Phase.FINISHED:
                    self._dequeue(req)
                    self._finish(req, FinishReason.ERROR)
                    events.append(RequestEvent(rid, finish_reason=FinishReason.ERROR, error=result.error))
            return events
        sampled = {s.request_id: s for s in result.sampled}
        events: list[RequestEvent] = []
        for rid in rids:
            req = self.reqs[rid]
            if req.phase == Phase.FINISHED:  # aborted while its batch ran
                continue
            tok = sampled.get(rid)
            if kind == "prefill":
                self._after_prefill(req, tok is not None)
            if tok is None:
                continue
            req.outputs.append(tok.token_id)
            reason = self._finish_reason(req, tok.token_id)
            if reason is not None:
                self._dequeue(req)
                self._finish(req, reason)
            events.append(
                RequestEvent(
                    rid,
                    token=tok,
                    finish_reason=reason,
                    num_prompt_tokens=req.prompt_len,
                    num_output_tokens=len(req.outputs),
                )
            )
        return events

    def has_unfinished(self) -> bool:
        return self._live > 0 or bool(self._releases)

    def kv_free_slots(self) -> list[int]:
        return [self.cluster.kv_slots_per_instance - u for u in self._used]

    @property
    def prefix_cache_enabled(self) -> bool:
        return False  # the baselines' own caches (vllm-apc) report through `stats`

    def cached_kv_per_instance(self) -> list[int]:
        return [0] * self.cluster.num_instances

    def prefix_cache_stats(self) -> dict[str, Any]:
        return {"enabled": False, "entries": 0, "hits": 0, "hit_tokens": 0, "evicted_tokens": 0}

    # -- hooks for policies ------------------------------------------------------------

    def _never_fits(self, request: NewRequest) -> str | None:
        need = request.prompt_len + request.sampling.max_tokens
        if need > self._group_capacity():
            return f"request needs {need} KV slots, more than the {self._group_capacity()} one replica holds"
        return None

    def _group_capacity(self) -> int:
        return self.cluster.kv_slots_per_instance

    def _enqueue(self, req: Req) -> None:
        raise NotImplementedError

    def _dequeue(self, req: Req) -> None:
        """Remove a finishing request from the policy's queues."""
        raise NotImplementedError

    def _after_prefill(self, req: Req, sampled: bool) -> None:
        raise NotImplementedError

    def _plan(self, now: float) -> IterationPlan:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------

    def _finish_reason(self, req: Req, token: int) -> FinishReason | None:
        sp = req.new.sampling
        if len(req.outputs) >= sp.max_tokens:
            return FinishReason.LENGTH
        if len(req.outputs) >= sp.min_tokens:
            if token in sp.stop_token_ids:
                return FinishReason.STOP
            if not sp.ignore_eos and token in self.eos_token_ids:
                return FinishReason.STOP
        return None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.phase = Phase.FINISHED
        self._live -= 1
        self._drop_kv(
            req,
            ReleaseReason.FINISHED
            if reason in (FinishReason.LENGTH, FinishReason.STOP)
            else ReleaseReason.ABORTED,
        )

    def _drop_kv(self, req: Req, reason: ReleaseReason) -> None:
        """Free the request's slots now and tell the executor in the next plan (releases
        run before that plan's batches, so the freed slots may be reused in it)."""
        if req.kv:
            self._releases.append(Release(req.rid, req.holders(), reason))
        for inst, n in req.alloc.items():
            self._used[inst] -= n
        req.alloc.clear()
        req.kv.clear()
        req.prefilled = 0

    #: allocation granularity in tokens (vLLM's paged blocks; 1 = token slots)
    block_size = 1

    def _blocks(self, n: int) -> int:
        """Slots needed to hold n tokens at this policy's allocation granularity."""
        b = self.block_size
        return -(-n // b) * b

    def _grow(self, req: Req, inst: int, n: int) -> None:
        """Record n more KV tokens of `req` on `inst`, allocating slots as needed."""
        req.kv[inst] = req.kv.get(inst, 0) + n
        need = self._blocks(req.kv[inst])
        have = req.alloc.get(inst, 0)
        if need > have:
            req.alloc[inst] = need
            self._used[inst] += need - have

    def _free(self, inst: int) -> int:
        return self.cluster.kv_slots_per_instance - self._used[inst]

    def _move_kv(self, req: Req, src: int, dst: int) -> int:
        """Move all KV of `req` from src to dst (migration); returns the token count."""
        n = req.kv.pop(src)
        self._used[src] -= req.alloc.pop(src)
        self._grow(req, dst, n)
        return n

    def _idle(self, instances) -> bool:
        return all(self._busy[i] == 0 for i in instances)

    def _new_batch_id(self, kind: str, rids: tuple[str, ...], instances) -> int:
        bid = self._next_batch
        self._next_batch += 1
        self._batches[bid] = (kind, rids)
        for i in instances:
            self._busy[i] += 1
        for rid in rids:
            self.reqs[rid].in_flight = True
        return bid

    def _prefill_item(
        self, req: Req, start: int, end: int, ring: tuple[int, ...], keep: list[tuple[int, int]]
    ) -> PrefillItem:
        """A prefill item over positions [start, end), kept as contiguous shares
        `keep` = [(instance, n tokens)] in order; records the KV in the request's view.
        Positions past the prompt are recomputed outputs (re-prefill after preemption)."""
        cached = req.holders() if start > 0 else ()
        keeps, pos = [], start
        for inst, n in keep:
            if n > 0:
                keeps.append(KVKeep(inst, (TokenRange(pos, pos + n),)))
                self._grow(req, inst, n)
                pos += n
        if pos != end:
            raise AssertionError(f"keep shares cover [{start}, {pos}), not [{start}, {end})")
        extra = ()
        if end > req.prompt_len:
            extra = tuple(req.outputs[max(0, start - req.prompt_len) : end - req.prompt_len])
        req.prefilled = end
        return PrefillItem(
            request_id=req.rid,
            tokens=TokenRange(start, end),
            stripe_offset=req.order % len(ring),
            keep=tuple(keeps),
            cached_holders=cached,
            sample=end == req.prefill_target,
            extra_token_ids=extra,
        )

    def _prefill_batch(self, ring: tuple[int, ...], items: list[PrefillItem]) -> PrefillBatch:
        bid = self._new_batch_id("prefill", tuple(it.request_id for it in items), ring)
        return PrefillBatch(bid, ring, tuple(items))

    def _decode_item(self, req: Req, master: int, new_kv: int) -> DecodeItem:
        item = DecodeItem(
            req.rid,
            input_token=req.outputs[-1],
            position=req.prompt_len + len(req.outputs) - 1,
            master=master,
            holders=req.holders(),
            new_kv_instance=new_kv,
        )
        self._grow(req, new_kv, 1)
        return item

    def _decode_batch(self, instances: tuple[int, ...], items: list[DecodeItem]) -> DecodeBatch:
        bid = self._new_batch_id("decode", tuple(it.request_id for it in items), instances)
        return DecodeBatch(bid, instances, tuple(items))

    def _emit(
        self, prefills: list[PrefillBatch], decodes: list[DecodeBatch], migrations: list[Migration] = ()
    ) -> IterationPlan:
        new = []
        for b in (*prefills, *decodes):
            for it in b.items:
                req = self.reqs[it.request_id]
                if not req.sent:
                    req.sent = True
                    new.append(req.new)
        releases, self._releases = tuple(self._releases), []
        plan = IterationPlan(
            self._next_plan, tuple(new), tuple(prefills), tuple(decodes), tuple(migrations), releases
        )
        self._next_plan += 1
        return plan
