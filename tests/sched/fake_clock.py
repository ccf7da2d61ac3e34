"""A tiny discrete-event driver for scheduler tests: fake clock, hand-made results.

Batches take `step_time(batch)` seconds; sampled token ids come from `token_fn(rid, k)`
(k = index of the output); after every event the scheduler's invariants are checked
and every plan is validated with `check_plan` against the state it was planned from.
A batch starts when its instances finish what they run (a decode look-ahead step is
planned while the step it follows runs); with `decode_lookahead` on, the scheduler is
asked again after a plan that started decode steps, as the controller does.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from esp_core.sched.interface import FinishReason, RequestRejected
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    IterationPlan,
    NewRequest,
    PrefillBatch,
    SampledToken,
)
from esp_core.sched.plan_check import check_plan, snapshot


def a800_scheduler(num_instances: int = 4, slots: int = 50_000, **cfg):
    """An ESP scheduler with the default A800 cost model and `cfg` overrides."""
    from esp_core.sched.config import ESPSchedulerConfig
    from esp_core.sched.cost_model import CostModel
    from esp_core.sched.interface import ClusterSpec
    from esp_core.sched.scheduler import ESPScheduler

    return ESPScheduler(
        ClusterSpec(num_instances, slots), CostModel.default_a800(), ESPSchedulerConfig(**cfg)
    )


def chunked_a800_scheduler(**cfg):
    """4 A800 instances of 50K slots, chunked prefill in 2K-token adaptive chunks."""
    return a800_scheduler(4, 50_000, chunked_prefill=True, chunk_tokens=2000, adaptive_chunking=True, **cfg)


def prefill_by_tokens_step_time(batch) -> float:
    """A prefill takes 10 us per token divided by its ring; a decode step 5 ms."""
    from esp_core.sched.plan import PrefillBatch

    return 1e-5 * batch.num_tokens / batch.dop if isinstance(batch, PrefillBatch) else 0.005


def prompt_request(rid: str, prompt_len: int, max_tokens: int, t: float) -> NewRequest:
    """A request of `prompt_len` distinct token ids arriving at `t`."""
    from esp_core.sched.plan import SamplingParams

    return NewRequest(rid, tuple(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens), t)


def decode_batches(res: RunResult) -> list[DecodeBatch]:
    """Every decode batch of a run (needs `keep_plans`)."""
    return [b for p in res.plans for b in p.decodes]


def default_step_time(batch: PrefillBatch | DecodeBatch) -> float:
    if isinstance(batch, PrefillBatch):
        return 0.01 + 1e-5 * batch.num_tokens / batch.dop
    return 0.005


@dataclass
class RunResult:
    finishes: dict[str, FinishReason] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    plans: list[IterationPlan] = field(default_factory=list)
    end_time: float = 0.0
    first_token_time: dict[str, float] = field(default_factory=dict)


def run(
    scheduler,
    arrivals: list[tuple[float, NewRequest]],
    *,
    token_fn: Callable[[str, int], int] = lambda rid, k: 1000 + k,
    step_time: Callable[[PrefillBatch | DecodeBatch], float] = default_step_time,
    aborts: list[tuple[float, str]] = (),
    fail_batches: set[int] = frozenset(),
    max_events: int = 100_000,
    keep_plans: bool = False,
    check: bool = True,
) -> RunResult:
    res = RunResult()
    queue: list[tuple[float, int, str, object]] = []  # (time, seq, kind, payload)
    seq = 0
    for t, req in arrivals:
        queue.append((t, seq, "arrive", req))
        seq += 1
    for t, rid in aborts:
        queue.append((t, seq, "abort", rid))
        seq += 1
    heapq.heapify(queue)
    running = 0
    now = 0.0
    free_at: dict[int, float] = {}  # instance -> when its last batch ends

    def start(plan: IterationPlan) -> None:
        nonlocal seq, running
        for b in plan.batches():
            begin = max([now, *(free_at.get(i, now) for i in b.instances)])
            end = begin + step_time(b)
            for i in b.instances:
                free_at[i] = end
            heapq.heappush(queue, (end, seq, "done", b))
            seq += 1
            running += 1

    lookahead = getattr(getattr(scheduler, "config", None), "decode_lookahead", False)
    for _ in range(max_events):
        if not queue:
            if scheduler.has_unfinished():
                # only releases may be left: one more call must make progress
                plan = _schedule(scheduler, now, res, keep_plans, check)
                if plan.is_empty:
                    raise AssertionError(f"stuck at t={now}: unfinished work but an empty plan")
                start(plan)
                continue
            break
        now, _, kind, payload = heapq.heappop(queue)
        if kind == "arrive":
            try:
                scheduler.add_request(payload, now)
            except RequestRejected as e:
                res.rejected[payload.request_id] = e.code
        elif kind == "abort":
            for ev in scheduler.abort_request(payload, now):
                _record(res, ev, now)
        else:
            batch = payload
            running -= 1
            is_prefill = isinstance(batch, PrefillBatch)
            if batch.batch_id in fail_batches:
                result = BatchResult(
                    batch.batch_id,
                    "prefill" if is_prefill else "decode",
                    batch.instances,
                    error="injected failure",
                )
            else:
                sampled = []
                for it in batch.items:
                    if is_prefill and not it.sample:
                        continue
                    k = len(res.tokens.get(it.request_id, []))
                    sampled.append(SampledToken(it.request_id, token_fn(it.request_id, k)))
                result = BatchResult(
                    batch.batch_id,
                    "prefill" if is_prefill else "decode",
                    batch.instances,
                    tuple(sampled),
                    elapsed_s=step_time(batch),
                )
            for ev in scheduler.update(result, now):
                _record(res, ev, now)
        if check:
            scheduler.check_invariants()
        if queue and queue[0][0] == now:
            continue  # handle every event of this instant before planning
        plan = _schedule(scheduler, now, res, keep_plans, check)
        start(plan)
        while lookahead and plan.decodes:  # the controller asks again at once
            plan = _schedule(scheduler, now, res, keep_plans, check)
            start(plan)
    else:
        raise AssertionError("event budget exhausted")
    res.end_time = now
    return res


def _schedule(scheduler, now, res: RunResult, keep_plans: bool, check: bool) -> IterationPlan:
    before = snapshot(scheduler) if check else None
    plan = scheduler.schedule(now)
    if check:
        check_plan(plan, before)
        scheduler.check_invariants()
    if keep_plans:
        res.plans.append(plan)
    return plan


def _record(res: RunResult, ev, now: float) -> None:
    if ev.finish_reason is not None and ev.request_id in res.finishes:
        raise AssertionError(f"{ev.request_id} finished twice")
    if ev.token is not None:
        if ev.request_id in res.finishes:
            raise AssertionError(f"token for finished {ev.request_id}")
        res.tokens.setdefault(ev.request_id, []).append(ev.token.token_id)
        res.first_token_time.setdefault(ev.request_id, now)
    if ev.finish_reason is not None:
        res.finishes[ev.request_id] = ev.finish_reason
