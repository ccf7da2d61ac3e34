"""`ESPController`: one replica is one ESP group.

The replica lives in bundle 0 of a Serve-managed placement group and starts one
`ElasticInstance` per bundle 1..N. It owns the scheduler and runs an event-driven asyncio
loop (DESIGN 4, "Execution model"):

    wake up (request added/aborted, batch finished)
      -> plan = scheduler.schedule(now)           # new work on idle instances only
      -> one sub-plan per instance it concerns     # instance.execute.remote(sub_plan)
    ... each instance answers independently ...
      -> combine the results of a batch over its instances
      -> events = scheduler.update(result, now)   # tokens, finishes
      -> route events to per-request asyncio queues, read by `generate` streams.

The loop never blocks: instance calls are awaited as Ray futures, so health checks and
status calls are answered during a long prefill. Cancelling a `generate` stream (client
disconnect, stop string seen by the ingress) aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import RequestEvent, RequestRejected, Scheduler
from esp_core.sched.plan import BatchResult, IterationPlan, NewRequest
from esp_serve.app.calibration import Calibrator, make_cost_model, model_shape
from esp_serve.app.config import AppConfig, load_config
from esp_serve.app.dispatch import OutputHistory, ResultCombiner, sub_plan
from esp_serve.app.gc_tuning import freeze_startup_heap
from esp_serve.app.instance import ElasticInstance
from esp_serve.app.observer import EngineObserver
from esp_serve.app.protocol import (
    Admission,
    GenerateRequest,
    GroupStatus,
    InstanceKV,
    ModelInfo,
    TokenEvent,
)
from esp_serve.app.saturation import GroupLoad
from esp_serve.app.telemetry import TracingConfig

log = logging.getLogger("ray.serve")


def make_scheduler(
    cfg: AppConfig, max_model_len: int, eos_token_ids: tuple[int, ...], cost_model: CostModel | None = None
) -> Scheduler:
    """The policy named by `scheduler.policy`: "esp"/"loongserve" (ESPScheduler with the
    cost model) or "local" (LocalScheduler, DoP 1 per request)."""
    if cfg.scheduler.policy == "local":
        from esp_core.sched.local import LocalScheduler

        return LocalScheduler(cfg.cluster_spec(), cfg.local_scheduler_config(max_model_len, eos_token_ids))
    if cfg.scheduler.policy in ("esp", "loongserve"):
        from esp_core.sched.scheduler import ESPScheduler

        if cost_model is None:
            raise ValueError("the ESP scheduler needs a cost model")
        return ESPScheduler(
            cfg.cluster_spec(), cost_model, cfg.esp_scheduler_config(max_model_len, eos_token_ids)
        )
    raise ValueError(f"unknown scheduler policy {cfg.scheduler.policy!r}")


def instance_actor_name(group_id: str, rank: int) -> str:
    """Named so that operators (and the fault-injection test) can find an instance."""
    return f"esp-instance-{group_id}-{rank}"


def start_instance(cfg: AppConfig, rank: int, group_id: str) -> Any:
    """The ElasticInstance of bundle rank+1 of the replica's placement group (or a plain
    actor with the same resources when run outside a placement group, e.g. in tools)."""
    pg = ray.util.get_current_placement_group()
    res = dict(cfg.cluster.instance_resources)
    num_cpus, num_gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
    n = cfg.cluster.num_instances
    options: dict[str, Any] = dict(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=res,
        max_restarts=0,
        name=instance_actor_name(group_id, rank),
    )
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank + 1
        )
    return ElasticInstance.options(**options).remote(cfg.worker_kwargs(), rank, n)


def start_instances(cfg: AppConfig, group_id: str) -> list[Any]:
    return [start_instance(cfg, rank, group_id) for rank in range(cfg.cluster.num_instances)]


class ESPController:
    """The deployment class (decorated with serve.deployment in app/builder.py)."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = load_config(config)
        t0 = time.monotonic()
        self.group_id = uuid.uuid4().hex[:8]
        self.instances = start_instances(self.cfg, self.group_id)
        timeout = self.cfg.cluster.instance_start_timeout_s
        await asyncio.wait_for(asyncio.gather(*(a.ready.remote() for a in self.instances)), timeout)
        # the pools the instances sized from their memory budget (app/config.py)
        self.memory_plans = await asyncio.gather(*(a.memory_plan.remote() for a in self.instances))
        self.cfg = self.cfg.with_memory_plan(
            min(p["kv_slots"] for p in self.memory_plans),
            min(p.get("piece_tokens", 1 << 62) for p in self.memory_plans),
        )
        log.info(
            "ESP group %s memory per instance: %s",
            self.group_id,
            "; ".join(
                f"KV pool {p['kv_slots']} tokens"
                + (
                    f" ({p['kv_bytes'] / 2**30:.2f} GiB), weights {p['weight_bytes'] / 2**30:.2f} GiB, "
                    f"activations {p['activation_bytes'] / 2**30:.2f} GiB for {p['piece_tokens']}-token "
                    f"pieces, budget {p['budget_bytes'] / 2**30:.2f} GiB"
                    if "budget_bytes" in p
                    else " (fixed)"
                )
                for p in self.memory_plans
            ),
        )
        arch = await asyncio.wait_for(self.instances[0].model_info.remote(), timeout)
        self.info = self._model_info(arch)
        self.esp = self.cfg.scheduler.policy != "local"
        cost = None
        if self.esp:
            shape = model_shape(arch, self.cfg.model.dtype, self.info.served_name)
            cost = make_cost_model(self.cfg.scheduler.cost_profile, self.cfg.scheduler.hardware, shape)
        s = self.cfg.scheduler
        self.calibrator = (
            Calibrator(cost, s.calibration_interval_s, s.calibration_min_records, s.save_profile)
            if cost is not None
            else None
        )
        self.scheduler = self._new_scheduler()
        # metrics (Ray's Prometheus export) and traces (off unless telemetry.tracing says)
        self.obs = EngineObserver(
            self.info.served_name, self.group_id, TracingConfig.from_section(self.cfg.telemetry)
        )
        self._kv_total = self.cfg.cluster.kv_slots_per_instance
        self._observe_kv()
        if self.esp and len(self.instances) > 1:
            await self._join_group()
        self.max_waiting = self.cfg.scheduler.max_waiting_requests
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._awaiting_first: set[str] = set()  # the bounded queue: no token yet
        self._requests: dict[str, NewRequest] = {}  # unfinished, to re-queue after a fault
        self._started: set[str] = set()  # requests some instance has state or KV for
        self._wake = asyncio.Event()
        self._shutting_down = False
        self._loop_error: BaseException | None = None
        self._recovery: asyncio.Task | None = None
        self.recoveries = 0
        # how many prefill batches ran at each DoP, decode steps at each instance count
        self.prefill_dops: collections.Counter[int] = collections.Counter()
        self.decode_widths: collections.Counter[int] = collections.Counter()
        self._reset_execution()
        # the startup heap out of every later full collection (app/gc_tuning.py)
        frozen = freeze_startup_heap()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        log.info(
            "ESP group %s up: %d instances in %.1fs, policy %s, model %s, "
            "max_model_len %d, %d startup objects frozen for the GC",
            self.group_id,
            len(self.instances),
            time.monotonic() - t0,
            self.cfg.scheduler.policy,
            self.info.served_name,
            self.info.max_model_len,
            frozen,
        )

    def _new_scheduler(self) -> Scheduler:
        cost = self.calibrator.model if self.calibrator else None
        return make_scheduler(self.cfg, self.info.max_model_len, self.info.eos_token_ids, cost)

    def _reset_execution(self) -> None:
        """Per-instance dispatch state; a new generation ignores results of the old one."""
        self._generation = getattr(self, "_generation", 0) + 1
        n = len(self.instances)
        self._queues: list[collections.deque[IterationPlan]] = [collections.deque() for _ in range(n)]
        self._executing: list[bool] = [False] * n
        old = getattr(self, "_history", None)
        self._history = OutputHistory()
        self._combiner = ResultCombiner()
        for rid, req in self._requests.items():
            self._history.add_request(rid, len(req.prompt_token_ids), req)
            if old is not None:  # outputs already streamed (a resumed request keeps them)
                self._history.outputs[rid] = list(old.outputs.get(rid, ()))

    async def _join_group(self) -> None:
        """All instances join one torch.distributed world group (rendezvous on a free port
        of instance 0's node), with explicit timeouts."""
        c = self.cfg.cluster
        ip, port = await asyncio.wait_for(self.instances[0].rendezvous.remote(), 30)
        init = f"tcp://{ip}:{port}"
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    a.join_group.remote(init, c.comm_backend, c.group_init_timeout_s, c.comm_timeout_s)
                    for a in self.instances
                )
            ),
            c.group_init_timeout_s + 10,
        )
        log.info(
            "ESP group %s: %d instances joined the %s world group at %s",
            self.group_id,
            len(self.instances),
            c.comm_backend,
            init,
        )

    def _model_info(self, arch: dict[str, Any]) -> ModelInfo:
        from esp_core.tokenizer import load_tokenizer

        max_ctx = arch["max_context_len"]
        max_len = self.cfg.model.max_model_len or max_ctx
        if max_len > max_ctx:
            raise ValueError(
                f"model.max_model_len {max_len} exceeds the model's context of "
                f"{max_ctx} tokens: lower it or remove it"
            )
        tokenizer = load_tokenizer(self.cfg.model.tokenizer_path)
        eos = tuple(dict.fromkeys((*arch["eos_token_ids"], *tokenizer.eos_token_ids)))
        return ModelInfo(self.cfg.model.name, arch["vocab_size"], max_len, eos)

    # ------------------------------------------------------------------ public methods

    async def model_info(self) -> ModelInfo:
        return self.info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        """Stream: an Admission, then lists of TokenEvent until one has finish_reason."""
        rid = request.request_id
        now = time.monotonic()
        if self._loop_error is not None or self._shutting_down:
            why = "is shutting down" if self._shutting_down else "failed and is restarting"
            yield Admission(
                False, 503, "unavailable", f"the ESP group {why}", retry_after_s=self.cfg.server.retry_after_s
            )
            return
        if len(self._awaiting_first) >= self.max_waiting:
            yield Admission(
                False,
                503,
                "queue_full",
                f"The server is overloaded: {len(self._awaiting_first)} requests are "
                "waiting (scheduler.max_waiting_requests); retry later.",
                retry_after_s=self.cfg.server.retry_after_s,
            )
            return
        sampling = request.sampling
        if sampling.seed is None:  # fixed for the request's lifetime (plan.SamplingParams)
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(62))
        new = NewRequest(rid, tuple(request.prompt_token_ids), sampling, arrival_time=now)
        try:
            self.scheduler.add_request(new, now)
        except RequestRejected as err:
            yield Admission(False, 400, err.code, str(err))
            return
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[rid] = queue
        self._awaiting_first.add(rid)
        self._requests[rid] = new
        self._history.add_request(rid, len(request.prompt_token_ids), new)
        self.obs.on_request_arrived(rid, len(new.prompt_token_ids), request.trace_context, now)
        self._wake.set()
        finished = False
        try:
            yield Admission(True)
            while not finished:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                finished = any(e.finish_reason is not None for e in events)
                yield events
        finally:
            self._streams.pop(rid, None)
            self._awaiting_first.discard(rid)
            if not finished:  # the caller went away (disconnect, stop string): free the KV
                self.obs.on_aborted(rid, time.monotonic())
                self.scheduler.abort_request(rid, time.monotonic())
                self._forget(rid)
                self._wake.set()

    async def status(self) -> GroupStatus:
        answers = await asyncio.gather(
            *(asyncio.wait_for(a.kv_state.remote(), 30) for a in self.instances), return_exceptions=True
        )
        kv = tuple(a for a in answers if isinstance(a, InstanceKV))
        extra: dict[str, Any] = {
            "unfinished": self.scheduler.has_unfinished(),
            "batches_in_flight": self._combiner.pending(),
            "policy": self.cfg.scheduler.policy,
            "group_id": self.group_id,
            "recovering": self._recovery is not None,
            "recoveries": self.recoveries,
            "instances_answering": len(kv),
            "memory_per_instance": list(self.memory_plans),
            "prefill_dop_counts": {str(k): v for k, v in sorted(self.prefill_dops.items())},
            "decode_width_counts": {str(k): v for k, v in sorted(self.decode_widths.items())},
        }
        stats = getattr(self.scheduler, "stats", None)
        if isinstance(stats, dict):
            extra["scheduler_stats"] = dict(stats)
        if self.calibrator is not None:
            extra["cost_model"] = {
                "source": self.calibrator.model.source,
                "records": len(self.calibrator.records),
                "refits": self.calibrator.refits,
            }
        return GroupStatus(
            instances=kv,
            scheduler_free_slots=tuple(self.scheduler.kv_free_slots()),
            waiting=len(self._awaiting_first),
            running=len(self._streams) - len(self._awaiting_first),
            extra=extra,
        )

    def load(self) -> GroupLoad:
        """The group's KV demand (app/saturation.py), from the scheduler's accounting."""
        used = sum(self._kv_total - f for f in self.scheduler.kv_free_slots())
        queued = sum(
            len(self._requests[r].prompt_token_ids) for r in self._awaiting_first if r in self._requests
        )
        return GroupLoad(
            used,
            self._kv_total * len(self.instances),
            queued,
            waiting=len(self._awaiting_first),
            running=len(self._streams) - len(self._awaiting_first),
        )

    def record_routing_stats(self) -> dict[str, float]:
        """Serve polls this for the request router (app/routing.py)."""
        return self.load().to_stats()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook (app/autoscaling.py's policy reads
        esp_saturation)."""
        return self.load().to_stats()

    async def __del__(self) -> None:
        """Serve's shutdown hook, after graceful_shutdown_timeout_s let in-flight
        streams finish: the streams still open end with a clear error (not a silent
        cut), the loop stops, spans are flushed. The instances go with the replica's
        placement group."""
        if getattr(self, "_shutting_down", True):
            return  # not fully constructed, or already drained
        self._shutting_down = True
        now = time.monotonic()
        message = (
            "the ESP group serving this request was shut down (scale-down or "
            "redeploy) before it finished: retry it"
        )
        for rid, queue in list(self._streams.items()):
            self.obs.on_failed(rid, message, now)
            queue.put_nowait(TokenEvent(None, finish_reason="error", error=message))
        await asyncio.sleep(0)  # let the generate streams forward their last event
        self._loop_task.cancel()
        self.obs.shutdown()
        log.info("ESP group %s shut down (%d streams ended early)", self.group_id, len(self._streams))

    async def health(self) -> bool:
        self._check_loop()
        return True

    async def check_health(self) -> None:
        """Serve's periodic health check: the loop is alive and every instance answers
        (from its control group, so a long prefill does not fail it). A dead instance
        starts an in-place rebuild instead of failing the replica."""
        self._check_loop()
        if self._recovery is not None:
            return
        answers = await asyncio.gather(
            *(asyncio.wait_for(a.ready.remote(), 20) for a in self.instances), return_exceptions=True
        )
        dead = {i for i, a in enumerate(answers) if isinstance(a, RayActorError)}
        if dead:
            self._start_recovery(dead, "health check")
        for a in answers:
            if isinstance(a, BaseException) and not isinstance(a, RayActorError):
                raise a

    def _check_loop(self) -> None:
        if self._loop_task.done() or self._loop_error is not None:
            raise RuntimeError(f"scheduler loop stopped: {self._loop_error!r}")

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        """The engine step: schedule -> execute (sub-plans sent, not awaited) -> update
        (in `_collect`, when a batch's last instance answers)."""
        try:
            while True:
                self._wake.clear()
                if self._recovery is None:
                    plan = self.scheduler.schedule(time.monotonic())
                    if not plan.is_empty:
                        self._dispatch(plan)
                    self._observe_kv()  # releases and admissions change it
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._fail_all(err)
            raise

    def _fail_all(self, err: BaseException) -> None:
        """A scheduler bug: end every stream with an error; health checks fail from now."""
        log.error("scheduler loop failed: %r", err, exc_info=err)
        self._loop_error = err
        now = time.monotonic()
        for rid, queue in self._streams.items():
            self.obs.on_failed(rid, f"scheduler failure: {err!r}", now)
            queue.put_nowait(TokenEvent(None, finish_reason="error", error=f"scheduler failure: {err!r}"))
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
        for batch in plan.batches():
            self._combiner.expect(batch)
            if self.calibrator is not None:
                self.calibrator.expect(batch)
        self._started.update(r.request_id for r in plan.new_requests)
        for i in range(len(self.instances)):
            part = sub_plan(plan, i, self._history)
            if part is not None:
                self._queues[i].append(part)
                self._pump(i)

    def _pump(self, i: int) -> None:
        if self._executing[i] or not self._queues[i]:
            return
        part = self._queues[i].popleft()
        self._executing[i] = True
        ref = self.instances[i].execute.remote(part)
        batch_ids = [b.batch_id for b in part.batches()]
        asyncio.get_running_loop().create_task(self._collect(self._generation, i, ref, batch_ids))

    async def _collect(self, generation: int, instance: int, ref: Any, batch_ids: list[int]) -> None:
        lost = False
        try:
            results: list[BatchResult] = await ref
        except RayActorError as err:  # the instance process is gone: rebuild the group
            results, lost = [], True
            log.error("instance %d died: %r", instance, err)
        except Exception as err:  # the instance raised: its batches failed
            log.error("instance %d failed a plan: %r", instance, err)
            results = [
                BatchResult(b, "", (instance,), error=f"instance {instance} failed: {err!r}")
                for b in batch_ids
            ]
        if generation != self._generation:
            return  # a result of the group before a rebuild: its requests were failed
        if lost:
            self._start_recovery({instance}, "execute")
            return
        broken = [r for r in results if r.error and len(r.instances) > 1]
        if broken:  # peers of a failed multi-instance batch may wait on this instance
            # until their transfer timeout, and a timed-out gloo pair stays closed: only
            # re-forming the world group restores a known state
            self._start_recovery(
                set(), f"batch {broken[0].batch_id} failed on instance {instance}: {broken[0].error}"
            )
            return
        self._executing[instance] = False
        self._pump(instance)
        done = []
        by_id = {r.batch_id: r for r in results}
        for b in batch_ids:
            r = by_id.get(b)
            if r is None:
                done.append(self._combiner.fail(instance, b, f"instance {instance} returned no result"))
            elif r.kind:
                done.append(self._combiner.add(instance, r))
            else:
                done.append(self._combiner.fail(instance, b, r.error or "failed"))
        now = time.monotonic()
        try:
            for result in done:
                if result is not None:
                    self.obs.on_batch_result(result, self._observe(result, now))
                    events = self.scheduler.update(result, now)
                    self.obs.on_events(events, now)
                    self._route(events)
        except Exception as err:
            self._fail_all(err)
        self._wake.set()

    def _observe(self, result: BatchResult, now: float) -> float | None:
        """Online calibration: measured vs predicted time; periodic refit. Returns the
        cost model's prediction of the batch's time (None when it has none), which also
        feeds esp_cost_model_error_ratio."""
        if self.calibrator is None:
            return None
        observation = self.calibrator.observe(result)
        if self.calibrator.due(now):
            try:
                self.scheduler.cost = self.calibrator.refit(now)
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
        for i, free in enumerate(self.scheduler.kv_free_slots()):
            self.obs.set_kv(i, self._kv_total - free, self._kv_total)

    def _route(self, events: list[RequestEvent]) -> None:
        for ev in events:
            if ev.token is not None:
                self._history.record(ev.request_id, ev.token.token_id)
            if ev.finish_reason is not None:
                self._forget(ev.request_id)
            queue = self._streams.get(ev.request_id)
            if queue is None:
                continue  # the stream was cancelled meanwhile
            self._awaiting_first.discard(ev.request_id)
            tok = ev.token
            queue.put_nowait(
                TokenEvent(
                    token_id=tok.token_id if tok else None,
                    logprob=tok.logprob if tok else None,
                    top_logprobs=tok.top_logprobs if tok else (),
                    finish_reason=ev.finish_reason.value if ev.finish_reason else None,
                    error=ev.error,
                    num_prompt_tokens=ev.num_prompt_tokens,
                    num_output_tokens=ev.num_output_tokens,
                )
            )

    def _forget(self, rid: str) -> None:
        self._history.forget(rid)
        self._requests.pop(rid, None)
        self._started.discard(rid)

    # ------------------------------------------------------------------ fault recovery

    def _start_recovery(self, dead: set[int], where: str) -> None:
        if self._recovery is not None:
            return
        log.error("ESP group %s: instances %s lost (%s): rebuilding", self.group_id, sorted(dead), where)
        if dead:
            message = (
                f"instance(s) {sorted(dead)} of the ESP group died; the request's KV cache was lost: retry it"
            )
        else:
            message = f"the ESP group is being rebuilt after a failed batch ({where}): retry it"
        self._requeue_requests(message)
        self._recovery = asyncio.get_running_loop().create_task(self._recover(dead))

    def _requeue_requests(self, message: str) -> None:
        """Every unfinished request goes to a fresh scheduler. One that already streamed
        tokens is resumed: re-prefilled over prompt + those tokens, it continues to its
        max_tokens (the client sees no gap and no repeat); both policies (esp, local) can.
        A scheduler without `add_resumed_request` fails the requests some instance held
        state for, with a clear error; waiting requests go to it untouched."""
        self._generation += 1  # results of the old group are ignored from now
        self.scheduler = self._new_scheduler()
        resume = getattr(self.scheduler, "add_resumed_request", None)
        now = time.monotonic()
        for rid in list(self._requests):
            req = self._requests[rid]
            outputs = list(self._history.outputs.get(rid, ()))
            if resume is not None:
                try:
                    resume(req, outputs, now)
                except RequestRejected as err:
                    self._fail_request(rid, f"{message} ({err})", now)
                    continue
                self._started.discard(rid)  # started again when its re-prefill is planned
            elif rid in self._started:
                self._fail_request(rid, message, now)
            else:
                self.scheduler.add_request(req, now)

    def _fail_request(self, rid: str, message: str, now: float) -> None:
        req = self._requests[rid]
        self._forget(rid)
        self.obs.on_failed(rid, message, now)
        queue = self._streams.get(rid)
        if queue is not None:
            queue.put_nowait(
                TokenEvent(
                    None, finish_reason="error", error=message, num_prompt_tokens=len(req.prompt_token_ids)
                )
            )

    async def _recover(self, dead: set[int]) -> None:
        """Replace dead instances in their bundles, clear the survivors, re-form the world
        group. Until it is done, new requests queue in the fresh scheduler."""
        t0 = time.monotonic()
        c = self.cfg.cluster
        try:
            survivors = [i for i in range(len(self.instances)) if i not in dead]
            # a survivor finishes (or fails) its current plan before `reset` runs; one that
            # does not answer in time is replaced too
            answers = await asyncio.gather(
                *(
                    asyncio.wait_for(self.instances[i].reset.remote(), c.group_init_timeout_s)
                    for i in survivors
                ),
                return_exceptions=True,
            )
            for i, a in zip(survivors, answers):
                if isinstance(a, BaseException):
                    log.error("instance %d did not reset (%r): replacing it", i, a)
                    ray.kill(self.instances[i])
                    dead.add(i)
            for i in sorted(dead):
                self.instances[i] = start_instance(self.cfg, i, self.group_id + f"r{self.recoveries + 1}")
            await asyncio.wait_for(
                asyncio.gather(*(self.instances[i].ready.remote() for i in dead)), c.instance_start_timeout_s
            )
            if self.esp and len(self.instances) > 1:
                await self._join_group()
            self._reset_execution()
            self.recoveries += 1
            log.warning(
                "ESP group %s rebuilt in %.1fs (instances %s replaced)",
                self.group_id,
                time.monotonic() - t0,
                sorted(dead),
            )
        except Exception as err:
            self._fail_all(err)  # health checks fail: Serve restarts the whole replica
        finally:
            self._recovery = None
            self._wake.set()
