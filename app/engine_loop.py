"""The controller's engine step (a mixin of `ESPController`, app/controller.py):

    wake up (request added/aborted, batch finished)
      -> plan = scheduler.schedule(now)           # new work on idle instances only
      -> one sub-plan per instance it concerns     # on its plan channel (app/plan_channel.py)
    ... each instance answers independently ...
      -> combine the results of a batch over its instances
      -> events = scheduler.update(result, now)   # tokens, finishes
      -> route events to the outbox of each request's ingress (app/outbox.py), which
         its one `subscribe` stream takes whole: one item per step per ingress.

After a plan that started decode steps the scheduler is asked again at once, so a
decode group's look-ahead step (esp_core/sched/lookahead.py) is sent while the step it
follows runs: up to two sub-plans per instance are outstanding, applied in order.

It uses the controller's scheduler, instances, per-instance plan queues (`_queues`,
`_outstanding`), result combiner, streams and observer; fault recovery
(app/recovery.py) takes over when a batch fails, an instance dies, or an instance runs a
sub-plan past its watchdog limit (`_collect` waits on each instance with a timeout).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import Any

from ray.exceptions import RayActorError

from esp_core.sched.interface import RequestEvent
from esp_core.sched.plan import BatchResult, IterationPlan
from esp_serve.app.dispatch import sub_plan
from esp_serve.app.failures import watchdog_deadline_s
from esp_serve.app.gc_tuning import deferred_collections
from esp_serve.app.instance_group import execute_on_ranks
from esp_serve.app.plan_channel import ChannelClosed
from esp_serve.app.protocol import TokenEvent
from esp_serve.app.streaming import within

log = logging.getLogger("ray.serve")

# sub-plans sent to one instance and not answered yet: a step and its look-ahead step
MAX_OUTSTANDING = 2
# plans one wake-up may make (each after one that started decode steps): a bound only
_MAX_PLANS_PER_WAKE = 4


class EngineLoop:
    """The engine step of `ESPController` (its state lives there; see the module doc)."""

    async def _run(self) -> None:
        """The engine step: schedule -> execute (sub-plans sent, not awaited) -> update
        (in `_collect`, when a batch's last instance answers)."""
        try:
            while True:
                self._wake.clear()
                if self._recovery is None:
                    # no young collection between deciding and sending (app/gc_tuning.py)
                    with deferred_collections():
                        self._schedule_and_dispatch()
                    self._observe_kv()  # releases and admissions change it
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._fail_all(err)
            raise

    def _schedule_and_dispatch(self) -> None:
        """Plan and send until a plan starts no decode step: right after a plan that
        started decode steps, the scheduler is asked again, so a group's look-ahead step
        (esp_core/sched/lookahead.py) leaves while the step it follows runs."""
        for _ in range(_MAX_PLANS_PER_WAKE):
            plan = self.scheduler.schedule(time.monotonic())
            if plan.is_empty:
                return
            self._dispatch(plan)
            if not plan.decodes or not self.cfg.scheduler.decode_lookahead:
                return

    def _fail_all(self, err: BaseException, message: str | None = None) -> None:
        """A scheduler bug, a failed rebuild, too many rebuilds: end every stream with an
        error (`message`, else the exception); health checks fail from now on, so Serve
        replaces the replica."""
        log.error("ESP group stopped: %r", err, exc_info=err)
        self._loop_error = err
        message = message or f"scheduler failure: {err!r}"
        now = time.monotonic()
        for rid in self._streams:
            self.obs.on_failed(rid, message, now)
            self._emit(rid, TokenEvent(None, finish_reason="error", error=message))
        if not self._loop_task.done():
            self._loop_task.cancel()

    def _dispatch(self, plan: IterationPlan) -> None:
        """Queue each instance's sub-plan. An instance runs its sub-plans one at a time in
        plan order (`_pump`): every instance then meets the batches it shares with others
        in the same order, so P2P transfers can never wait on each other in a cycle.
        The scheduler plans batches on idle instances only, so in practice a batch starts
        on all its instances at once."""
        self.obs.on_plan(plan, time.monotonic())
        for batch in plan.prefills:
            self.prefill_dops[len(batch.instances)] += 1
        for batch in plan.decodes:
            self.decode_widths[len(batch.instances)] += 1
            self.lookahead_steps += batch.is_lookahead
        for batch in plan.batches():
            rids = tuple(item.request_id for item in batch.items)
            self._batch_requests[batch.batch_id] = rids  # charged if the batch fails
            self._batch_instances[batch.batch_id] = tuple(batch.instances)
            for rid in rids:  # where each request has state or KV
                self._placed.setdefault(rid, set()).update(batch.instances)
            self._combiner.expect(batch)
            if self.calibrator is not None:
                self.calibrator.expect(batch)
        self._started.update(r.request_id for r in plan.new_requests)
        for i in range(len(self.instances)):
            part = sub_plan(plan, i)
            if part is not None:
                self._queues[i].append(part)
                self._pump(i)

    def _pump(self, i: int) -> None:
        """Send instance i's next sub-plans, up to MAX_OUTSTANDING at once: the instance
        runs them in this order (app/plan_order.py), the second as soon as the first ends."""
        while len(self._outstanding[i]) < MAX_OUTSTANDING and self._queues[i]:
            part = self._queues[i].popleft()
            seq = self._sent[i]
            self._sent[i] += 1
            # pickled once, the same bytes to every TP rank of instance i
            data = pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)
            ref = execute_on_ranks(self.channels[i], data, self._generation, seq)
            batch_ids = [b.batch_id for b in part.batches()]
            # the watchdog of a queued sub-plan counts the one it runs after
            ahead = [b for earlier, _ in self._outstanding[i] for b in earlier]
            limit_s = self._watchdog_s(ahead + batch_ids)
            before = self._outstanding[i][-1][1] if self._outstanding[i] else None
            task = asyncio.get_running_loop().create_task(
                self._collect(self._generation, i, ref, batch_ids, limit_s, before)
            )
            self._outstanding[i].append((batch_ids, task))

    async def _collect(
        self,
        generation: int,
        instance: int,
        ref: Any,
        batch_ids: list[int],
        limit_s: float,
        before: asyncio.Task | None = None,
    ) -> None:
        """Await instance `instance`'s results of one sub-plan (at most `limit_s`: the
        watchdog), then either start a recovery (dead or hung instance, failed batch) or
        combine them and update the scheduler, after the sub-plan sent `before` it (a
        look-ahead step's result is applied after the step it follows)."""
        lost = hung = False
        try:
            # a timer, not the task `asyncio.wait_for` makes on Python 3.10/3.11, per step
            deadline = asyncio.get_running_loop().time() + limit_s
            results: list[BatchResult] = pickle.loads(await within(deadline, ref))
        except TimeoutError:  # (from `within`) hung: a wedged collective, a runaway kernel
            results, hung = [], True
        except (RayActorError, ChannelClosed) as err:  # the instance process is gone: rebuild
            results, lost = [], True
            log.error("instance %d died: %r", instance, err)
        except Exception as err:  # the instance raised: its batches failed
            log.error("instance %d failed a plan: %r", instance, err)
            results = [
                BatchResult(b, "", (instance,), error=f"{type(err).__name__}: instance {instance} failed")
                for b in batch_ids
            ]
        if before is not None and not before.done():
            await asyncio.wait([before])
        if generation != self._generation:
            return  # a result of the group before a rebuild: its requests were re-queued
        if hung:
            self._instance_hung(instance, batch_ids, limit_s)
            return
        if lost:
            self._instances_lost({instance}, "execute")
            return
        failed = [r for r in results if r.error]
        if failed:  # charged to its requests; a rebuild restores a known state (peers of
            # a multi-instance batch, or the other TP ranks of this instance, may have
            # timed out on this one, and a timed-out gloo pair stays closed)
            self._batches_failed(instance, failed)
            return
        self._outstanding[instance].popleft()
        self._pump(instance)
        self._complete(instance, batch_ids, results)

    def _complete(self, instance: int, batch_ids: list[int], results: list[BatchResult]) -> None:
        done = []
        by_id = {r.batch_id: r for r in results}
        for b in batch_ids:
            r = by_id.get(b)
            if r is None:
                done.append(self._combiner.fail(instance, b, f"instance {instance} returned no result"))
            else:
                done.append(self._combiner.add(instance, r))
        now = time.monotonic()
        observed: list[tuple[BatchResult, float | None, list[RequestEvent]]] = []
        try:
            for result in done:
                if result is not None:
                    self._batch_requests.pop(result.batch_id, None)
                    self._batch_instances.pop(result.batch_id, None)
                    predicted_s = self._observe(result, now)
                    events = self.scheduler.update(result, now)
                    observed.append((result, predicted_s, events))
                    self._route(events)
        except Exception as err:
            self._fail_all(err)
        self._wake.set()
        if observed:
            # metrics and tracing after the next step is dispatched: the engine loop's
            # wake-up was queued first, and these Ray metric calls are not on the path
            # from one step's result to the next step's start
            asyncio.get_running_loop().call_soon(self._report, observed, now)

    def _report(
        self, observed: list[tuple[BatchResult, float | None, list[RequestEvent]]], now: float
    ) -> None:
        for result, predicted_s, events in observed:
            self.obs.on_batch_result(result, predicted_s)
            self.obs.on_events(events, now)

    def _watchdog_s(self, batch_ids: list[int]) -> float:
        """How long a sub-plan running these batches may take (app/failures.py:
        watchdog_deadline_s), from the estimates the calibrator made when the batches
        were dispatched."""
        r = self.cfg.recovery
        estimate = None
        if self.calibrator is not None:
            times = [self.calibrator.estimate_s(b) for b in batch_ids]
            estimate = sum(t for t in times if t is not None)
        return watchdog_deadline_s(r.watchdog_floor_s, r.watchdog_factor, estimate)

    def _observe(self, result: BatchResult, now: float) -> float | None:
        """Online calibration: measured vs predicted time; periodic refit. Returns the
        cost model's prediction of the batch's time (None when it has none), which also
        feeds esp_cost_model_error_ratio."""
        if self.calibrator is None:
            return None
        observation = self.calibrator.observe(result)
        if self.calibrator.due(now):
            try:
                self.scheduler.set_cost_model(self.calibrator.refit(now))
                log.info(
                    "cost model refit from %d batches: %s",
                    len(self.calibrator.records),
                    "; ".join(
                        f"{r.group}: mean rel err {r.mean_rel_err:.2f}" for r in self.calibrator.reports
                    ),
                )
            except Exception as err:  # a bad fit must not stop serving
                log.warning("cost model refit failed: %r", err)
        return observation.predicted_s if observation is not None else None

    def _observe_kv(self) -> None:
        """esp_kv_slots_used per instance, from the scheduler's accounting (the instances'
        own pools follow it within a step: releases are applied by their next plan)."""
        free = tuple(self.scheduler.kv_free_slots())
        cached = tuple(self.scheduler.cached_kv_per_instance())
        before = self._kv_reported
        if before is not None and len(before[0]) != len(free):
            before = None  # another group size: report everything again
        if (free, cached) == before:
            return  # unchanged since the last report: metric calls cost per engine step
        self._kv_reported = (free, cached)
        for i, f in enumerate(free):
            # only the instances whose numbers moved (a decode step moves one or a few;
            # each gauge set is a Ray metric call on the step's path), the constant total
            # only on the first report
            if before is not None and before[0][i] == f and before[1][i] == cached[i]:
                continue
            if before is None:
                self.obs.set_kv(i, self._kv_total - f, self._kv_total, cached[i])
            else:
                self.obs.set_kv(i, self._kv_total - f, None, None if before[1][i] == cached[i] else cached[i])

    def _route(self, events: list[RequestEvent]) -> None:
        for ev in events:
            if ev.token is not None:
                if self.ledger.on_token(ev.request_id):  # the request on trial is proven
                    self._admit_trial(time.monotonic())
            if ev.finish_reason is not None:
                self._forget(ev.request_id)
            if ev.request_id not in self._streams:
                continue  # cancelled meanwhile
            self._awaiting_first.discard(ev.request_id)
            tok = ev.token
            self._emit(
                ev.request_id,
                TokenEvent(
                    token_id=tok.token_id if tok else None,
                    logprob=tok.logprob if tok else None,
                    top_logprobs=tok.top_logprobs if tok else (),
                    finish_reason=ev.finish_reason.value if ev.finish_reason else None,
                    error=ev.error,
                    num_prompt_tokens=ev.num_prompt_tokens,
                    num_output_tokens=ev.num_output_tokens,
                    num_cached_tokens=ev.num_cached_tokens,
                ),
            )

    def _forget(self, rid: str) -> None:
        self._requests.pop(rid, None)
        self._started.discard(rid)
        self._placed.pop(rid, None)
        if self.ledger.forget(rid):  # it was on trial: the next suspect's turn
            self._admit_trial(time.monotonic())
