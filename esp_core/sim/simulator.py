"""Discrete-event simulation of an ESP group driving any `Scheduler` as the controller does.

Loop (the controller's, with a cost-model clock instead of real instances)::

    at each event time t (arrivals and batch completions, in time order):
        arrivals            -> scheduler.add_request(NewRequest, t)
        batch completions   -> scheduler.update(BatchResult, t)
        plan = scheduler.schedule(t)
        validate plan (instances idle, KV fits, holders real), apply releases and
        migrations, start batches: batches of the plan that share an instance run there
        back to back (plan order: prefills, then decodes); each ends after its cost-model
        time and comes back as a BatchResult at that time.

Outputs have known lengths (benchmark clients send `ignore_eos` with the dataset's
output length), so requests enter as `SamplingParams(max_tokens=out_len,
ignore_eos=True)`; the simulator picks the sampled token ids (a deterministic function
of request and position) and checks that every request finishes exactly once with
exactly its output length.

DistServe-like baselines set `migrations_pull_only = True`: their KV transfers are pulled
by the destination (charged the cost model's KV-transfer time there) and do not stop the
source instance, which keeps prefilling.

SplitFuse baselines set `fused_prefill_decode = True` on the scheduler: a prefill and a
decode batch of one plan on the same instances are then charged as one fused forward
(`BatchTimer.fused`) instead of back to back, which is what those systems execute.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from esp_core.sched.interface import FinishReason, RequestEvent, RequestRejected, Scheduler
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    IterationPlan,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    SampledToken,
    SamplingParams,
)
from esp_core.sim.kv_ledger import KVLedger, PlanError, check_decode_batch, check_prefill_item
from esp_core.sim.timing import PROFILE_ENGINE, BatchTimer, CostModelLike, Topology
from esp_core.sim.workloads import RequestSpec

_ARRIVAL, _COMPLETE = 0, 1
_EPS = 1e-9


class SimulationStuck(RuntimeError):
    """Requests remain but the scheduler starts no work and nothing is running."""


@dataclass
class RequestRecord:
    """What happened to one request (times in seconds of simulated time)."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # the known output length (the target)
    first_token_s: float | None = None
    finish_s: float | None = None
    generated: int = 0
    finish_reason: str | None = None
    rejected: str | None = None  # RequestRejected message when the scheduler refused it
    preemptions: int = 0

    @property
    def finished_ok(self) -> bool:
        return self.finish_reason == FinishReason.LENGTH.value and self.generated == self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SimStats:
    plans: int = 0
    prefill_batches: int = 0
    decode_steps: int = 0
    fused_iterations: int = 0
    migrations: int = 0
    migrated_tokens: int = 0
    preemptions: int = 0
    prefill_dop_hist: dict[int, int] = field(default_factory=dict)
    decode_dop_hist: dict[int, int] = field(default_factory=dict)
    busy_s: list[float] = field(default_factory=list)  # per instance
    # instance-seconds (batch duration x instances it occupies) by kind of batch
    prefill_inst_s: float = 0.0
    decode_inst_s: float = 0.0
    decode_batch_hist: dict[int, int] = field(default_factory=dict)  # requests per step: steps
    peak_kv_tokens: list[int] = field(default_factory=list)  # per instance
    prompt_tokens: int = 0  # of all requests
    # prompt tokens served from a prefix cache (the scheduler's stats()["cached_prompt_tokens"])
    cached_prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["prefill_dop_hist"] = {str(k): v for k, v in sorted(self.prefill_dop_hist.items())}
        d["decode_dop_hist"] = {str(k): v for k, v in sorted(self.decode_dop_hist.items())}
        d["decode_batch_hist"] = {str(k): v for k, v in sorted(self.decode_batch_hist.items())}
        return d


@dataclass
class SimResult:
    records: list[RequestRecord]
    end_s: float
    stats: SimStats
    scheduler_wall_s: float = 0.0  # wall time spent in schedule()/update(); not simulated
    schedule_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Deterministic summary (no wall-clock numbers): same seed -> same dict."""
        return {
            "end_s": self.end_s,
            "stats": self.stats.to_dict(),
            "requests": [r.to_dict() for r in self.records],
        }


def sim_token_id(index: int, position: int) -> int:
    """The token the simulator 'samples' for a request at a position: any fixed function
    works (outputs have known lengths); this one avoids ids 0-2 (special tokens)."""
    return 3 + (index * 7919 + position * 104729) % 31_000


def scheduler_cached_tokens(scheduler: Scheduler) -> int:
    """Prompt tokens the scheduler served from its prefix cache: `stats["cached_prompt_tokens"]`,
    else `prefix_cache_stats()["hit_tokens"]` (0 for a scheduler without a cache)."""
    stats = getattr(scheduler, "stats", None)  # the baselines keep no `stats`
    if isinstance(stats, dict) and "cached_prompt_tokens" in stats:
        return int(stats["cached_prompt_tokens"])
    return int(scheduler.prefix_cache_stats().get("hit_tokens", 0))


class Simulator:
    """Runs one workload through one scheduler on a simulated cluster.

    `scheduler.cluster` (ClusterSpec) gives the instance count, KV slots per instance and
    TP per instance; `cost_model` times every batch and migration.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        cost_model: CostModelLike,
        *,
        gpus_per_node: int = 8,
        validate: bool = True,
        max_sim_time_s: float = float("inf"),
        plan_checker: Callable[[Scheduler], Callable[[IterationPlan], None]] | None = None,
        cascade_decode: bool = True,
    ) -> None:
        self.sched = scheduler
        spec = scheduler.cluster
        self.n = spec.num_instances
        # A baseline may declare how its engine deviates from the profile (timing.py).
        engine = getattr(scheduler, "execution", None) or PROFILE_ENGINE
        # Decode reads KV several requests share once per step (timing.py, `cascade`); a
        # baseline with its own block cache says which blocks each request reads.
        cache_blocks = scheduler if hasattr(scheduler, "decode_cache_blocks") else None
        self.timer = BatchTimer(
            cost_model,
            Topology(spec.tp_per_instance, gpus_per_node),
            engine,
            cascade=cascade_decode,
            cache_blocks=cache_blocks,  # type: ignore[arg-type]
        )
        self.ledger = KVLedger(spec.num_instances, spec.kv_slots_per_instance)
        self.validate = validate
        self.max_sim_time_s = max_sim_time_s
        self.fused = bool(getattr(scheduler, "fused_prefill_decode", False))
        self.pull_migrations = bool(getattr(scheduler, "migrations_pull_only", False))
        # Prefix-caching baselines: a prefill may start past the KV its request holds;
        # the gap is cached prefix on `cached_holders[0]`, read but not owned.
        self.shared_prefix_reads = bool(getattr(scheduler, "shared_prefix_reads", False))
        # Optional extra check: called with the scheduler *before* each schedule() (to
        # snapshot its state), returns a function that checks the plan (raises if bad),
        # e.g. esp_core.sched.plan_check's snapshot + check_plan.
        self.plan_checker = plan_checker

        self._busy_until = [0.0] * self.n
        self._in_flight: set[str] = set()  # requests inside a running batch
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.stats = SimStats(busy_s=[0.0] * self.n)
        self.records: dict[str, RequestRecord] = {}
        self._index: dict[str, int] = {}
        self._last_token: dict[str, int] = {}
        self._wall = 0.0
        self._calls = 0

    # -- event queue -------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (t, self._seq, kind, payload))
        self._seq += 1

    # -- public ------------------------------------------------------------------------

    def run(self, requests: Sequence[RequestSpec]) -> SimResult:
        for i, spec in enumerate(requests):
            if spec.request_id in self.records:
                raise ValueError(f"duplicate request id {spec.request_id}")
            self.records[spec.request_id] = RequestRecord(
                spec.request_id, spec.arrival_s, spec.prompt_tokens, spec.output_tokens
            )
            self._index[spec.request_id] = i
            self._push(spec.arrival_s, _ARRIVAL, spec)

        now = 0.0
        while self._events:
            now = self._events[0][0]
            if now > self.max_sim_time_s:
                break
            while self._events and self._events[0][0] <= now + _EPS:
                _, _, kind, payload = heapq.heappop(self._events)
                if kind == _ARRIVAL:
                    self._arrive(payload, now)
                else:
                    self._complete(payload, now)
            self._schedule(now)
            if not self._events and self.sched.has_unfinished():
                raise SimulationStuck(
                    f"t={now:.3f}s: scheduler has unfinished requests but started no work "
                    f"(KV free {self.sched.kv_free_slots()})"
                )
        if self.validate and not self._events and sum(self.ledger.used) != self._cached_kv():
            raise PlanError(f"KV still held at the end: {self.ledger.used}")
        self.stats.peak_kv_tokens = list(self.ledger.peak)
        self.stats.prompt_tokens = sum(r.prompt_tokens for r in requests)
        self.stats.cached_prompt_tokens = scheduler_cached_tokens(self.sched)
        records = [self.records[r.request_id] for r in requests]
        return SimResult(records, now, self.stats, self._wall, self._calls)

    def _cached_kv(self) -> int:
        """KV the scheduler keeps on purpose after every request ended (prefix cache)."""
        return sum(self.sched.cached_kv_per_instance())

    # -- events ------------------------------------------------------------------------

    def _arrive(self, spec: RequestSpec, now: float) -> None:
        req = NewRequest(
            spec.request_id,
            (1,) * spec.prompt_tokens,
            SamplingParams(max_tokens=spec.output_tokens, ignore_eos=True, temperature=0.0),
            arrival_time=spec.arrival_s,
            block_hashes=spec.block_hashes,
        )
        t0 = time.perf_counter()
        try:
            self.sched.add_request(req, now)
        except RequestRejected as e:
            rec = self.records[spec.request_id]
            rec.rejected = str(e) or e.code
            rec.finish_reason = FinishReason.ABORT.value
            rec.finish_s = now
        finally:
            self._wall += time.perf_counter() - t0

    def _complete(self, payload: tuple[BatchResult, tuple[str, ...]], now: float) -> None:
        result, request_ids = payload
        for rid in request_ids:
            self._in_flight.discard(rid)
        t0 = time.perf_counter()
        events = self.sched.update(result, now)
        self._wall += time.perf_counter() - t0
        for ev in events:
            self._on_event(ev, now)

    def _on_event(self, ev: RequestEvent, now: float) -> None:
        rec = self.records.get(ev.request_id)
        if rec is None:
            raise PlanError(f"event for unknown request {ev.request_id}")
        if rec.finish_reason is not None:
            raise PlanError(f"{ev.request_id}: event after it finished ({rec.finish_reason})")
        if ev.token is not None:
            rec.generated += 1
            self._last_token[ev.request_id] = ev.token.token_id
            if rec.first_token_s is None:
                rec.first_token_s = now
        if ev.finish_reason is not None:
            rec.finish_reason = ev.finish_reason.value
            rec.finish_s = now
            if (
                self.validate
                and ev.finish_reason == FinishReason.LENGTH
                and rec.generated != rec.output_tokens
            ):
                raise PlanError(
                    f"{ev.request_id}: finished with {rec.generated} tokens, expected {rec.output_tokens}"
                )

    # -- plans -------------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        # A plan of releases only frees KV without starting work: ask again at once
        # (bounded) so freed memory is used at this instant, as the controller would.
        for _ in range(4):
            check = self.plan_checker(self.sched) if self.plan_checker else None
            t0 = time.perf_counter()
            plan = self.sched.schedule(now)
            self._wall += time.perf_counter() - t0
            self._calls += 1
            if check is not None:
                check(plan)
            if plan.is_empty:
                return
            self._apply(plan, now)
            if plan.prefills or plan.decodes or plan.migrations:
                return

    def _apply(self, plan: IterationPlan, now: float) -> None:
        self.stats.plans += 1
        # A pulled transfer (DistServe) occupies only its destination.
        used = plan.instances_used() | {m.dst for m in plan.migrations}
        if not self.pull_migrations:
            used |= {m.src for m in plan.migrations}
        for i in used:
            if not 0 <= i < self.n:
                raise PlanError(f"plan {plan.plan_id}: instance {i} does not exist")
            if self._busy_until[i] > now + _EPS:
                raise PlanError(
                    f"plan {plan.plan_id}: instance {i} busy until {self._busy_until[i]:.6f} > now {now:.6f}"
                )
        for rel in plan.releases:
            if rel.reason.value == "preempted":
                self.stats.preemptions += 1
                if rel.request_id in self.records:
                    self.records[rel.request_id].preemptions += 1
            self.ledger.release(rel)
        for adoption in plan.adoptions:  # prefix-cache hits, right after releases
            self.ledger.adopt(adoption)

        cursor = {i: now for i in used}  # (a share of cached KV moves nothing: no time)
        for mig in plan.migrations:
            if mig.request_id in self._in_flight:
                raise PlanError(f"migration of {mig.request_id} while it runs in a batch")
            if self.pull_migrations:
                cursor[mig.dst] += self.timer.kv_transfer(mig)
            else:
                end = max(cursor[mig.src], cursor[mig.dst]) + self.timer.migration(mig)
                cursor[mig.src] = cursor[mig.dst] = end
            self.stats.migrations += 1
            self.stats.migrated_tokens += self.ledger.migrate(mig)

        fused_pairs = self._fused_pairs(plan) if self.fused else {}
        fused_decodes = {d.batch_id for d in fused_pairs.values()}
        for batch in plan.prefills:
            dec = fused_pairs.get(batch.batch_id)
            if dec is not None:
                self._start_fused(batch, dec, cursor)
            else:
                self._start(batch, cursor, self._prefill_time(batch))
        for batch in plan.decodes:
            if batch.batch_id not in fused_decodes:
                self._start(batch, cursor, self._decode_time(batch))
        for i, t in cursor.items():
            if t > now:
                self.stats.busy_s[i] += t - max(now, self._busy_until[i])
            self._busy_until[i] = max(self._busy_until[i], t)

    def _fused_pairs(self, plan: IterationPlan) -> dict[int, DecodeBatch]:
        by_instances = {d.instances: d for d in plan.decodes}
        return {p.batch_id: by_instances[p.instances] for p in plan.prefills if p.instances in by_instances}

    def _claim(self, request_ids: list[str], batch_id: int) -> None:
        for rid in request_ids:
            if rid in self._in_flight:
                raise PlanError(f"batch {batch_id}: {rid} is already in a running batch")
            rec = self.records.get(rid)
            if rec is None or rec.finish_reason is not None:
                raise PlanError(f"batch {batch_id}: {rid} is unknown or finished")
            self._in_flight.add(rid)

    def _prefill_time(self, batch: PrefillBatch) -> float:
        self._claim([it.request_id for it in batch.items], batch.batch_id)
        fullest = self.timer.fullest_holders(batch, self.ledger)  # before the chunk's KV lands
        for it in batch.items:
            if self.validate:
                check_prefill_item(batch, it)
            if self.shared_prefix_reads:
                self._note_shared_prefix(batch, it)
            for k in it.keep:
                self.ledger.add(
                    it.request_id, k.instance, k.num_tokens, f"prefill {batch.batch_id}/{it.request_id}"
                )
        self.stats.prefill_batches += 1
        self.stats.prefill_dop_hist[batch.dop] = self.stats.prefill_dop_hist.get(batch.dop, 0) + 1
        # Timing uses the ring and chunk shapes, and the cached KV read before the keeps.
        return self.timer.prefill(batch, fullest)

    def _note_shared_prefix(self, batch: PrefillBatch, item: PrefillItem) -> None:
        gap = item.tokens.start - self.ledger.request_tokens(item.request_id)
        if gap <= 0:
            return
        if not item.cached_holders:
            raise PlanError(
                f"prefill {batch.batch_id}/{item.request_id}: starts at {item.tokens.start} with no KV"
            )
        self.ledger.add_shared(item.request_id, item.cached_holders[0], gap)

    def _begin_decode(self, batch: DecodeBatch) -> None:
        self._claim([it.request_id for it in batch.items], batch.batch_id)
        if not self.validate:
            return
        check_decode_batch(batch, self.ledger)
        for it in batch.items:
            rec = self.records[it.request_id]
            want = rec.prompt_tokens + rec.generated - 1
            if it.position != want:
                raise PlanError(
                    f"decode {batch.batch_id}/{it.request_id}: position {it.position}, expected {want}"
                )
            if it.input_token != self._last_token.get(it.request_id):
                raise PlanError(
                    f"decode {batch.batch_id}/{it.request_id}: input token "
                    f"{it.input_token} is not the last sampled token"
                )

    def _commit_decode(self, batch: DecodeBatch) -> None:
        for it in batch.items:
            self.ledger.add(it.request_id, it.new_kv_instance, 1, f"decode {batch.batch_id}/{it.request_id}")
        self.stats.decode_steps += 1
        d = len(batch.instances)
        self.stats.decode_dop_hist[d] = self.stats.decode_dop_hist.get(d, 0) + 1
        b = len(batch.items)
        self.stats.decode_batch_hist[b] = self.stats.decode_batch_hist.get(b, 0) + 1

    def _decode_time(self, batch: DecodeBatch) -> float:
        self._begin_decode(batch)
        dt = self.timer.decode(batch, self.ledger)  # KV read before the new tokens land
        self._commit_decode(batch)
        return dt

    def _start(self, batch: PrefillBatch | DecodeBatch, cursor: dict[int, float], duration: float) -> None:
        start = max(cursor[i] for i in batch.instances)
        end = start + duration
        for i in batch.instances:
            cursor[i] = end
        self._count_inst_s(batch, duration)
        self._push(
            end, _COMPLETE, (self._result(batch, duration), tuple(it.request_id for it in batch.items))
        )

    def _count_inst_s(self, batch: PrefillBatch | DecodeBatch, duration: float) -> None:
        inst_s = duration * len(batch.instances)
        if isinstance(batch, PrefillBatch):
            self.stats.prefill_inst_s += inst_s
        else:
            self.stats.decode_inst_s += inst_s

    def _start_fused(self, prefill: PrefillBatch, decode: DecodeBatch, cursor: dict[int, float]) -> None:
        self._prefill_time(prefill)  # validation + KV of the chunk
        self._begin_decode(decode)
        duration = self.timer.fused(prefill, decode, self.ledger)
        self._commit_decode(decode)
        self.stats.fused_iterations += 1
        start = max(cursor[i] for i in prefill.instances)
        end = start + duration
        for i in prefill.instances:
            cursor[i] = end
        self._count_inst_s(prefill, duration)  # (one iteration: counted as prefill)
        for batch in (prefill, decode):
            self._push(
                end, _COMPLETE, (self._result(batch, duration), tuple(it.request_id for it in batch.items))
            )

    def _result(self, batch: PrefillBatch | DecodeBatch, duration: float) -> BatchResult:
        sampled = []
        if isinstance(batch, PrefillBatch):
            for it in batch.items:
                if it.sample:
                    sampled.append(
                        SampledToken(it.request_id, sim_token_id(self._index[it.request_id], it.tokens.end))
                    )
            kind = "prefill"
        else:
            for it in batch.items:
                sampled.append(
                    SampledToken(it.request_id, sim_token_id(self._index[it.request_id], it.position + 1))
                )
            kind = "decode"
        return BatchResult(batch.batch_id, kind, batch.instances, tuple(sampled), elapsed_s=duration)
