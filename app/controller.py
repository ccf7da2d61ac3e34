"""`ESPController`: one replica is one ESP group.

The replica lives in bundle 0 of a Serve-managed placement group and starts one
`ElasticInstance` per bundle 1..N. It owns the scheduler and runs an event-driven asyncio
loop (DESIGN 4, "Execution model"). In pieces:

* this module: the deployment's public methods (`submit`, `subscribe`, `cancel`: the
  group-wide token stream, app/protocol.py; status, load, health, shutdown) and the
  group's start;
* app/outbox.py: each ingress replica's requests and the events not yet sent to it;
* app/engine_loop.py: the engine step (schedule -> sub-plans to instances -> combine
  results -> scheduler.update -> route tokens to streams);
* app/recovery.py: re-queue and rebuild after a dead or hung instance or a failed batch,
  charging each request's retries (app/failures.py: a poison request fails alone);
* app/instance_group.py: the instance actors and their world group.

The loop never blocks: instance calls are awaited as Ray futures, so health checks and
status calls are answered during a long prefill. `cancel` (client disconnect, stop string
seen by the ingress) aborts the request and frees its KV, and so does the end of an
ingress's subscription (the ingress is gone) for every request of that ingress.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError

from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import RequestRejected, Scheduler
from esp_core.sched.plan import IterationPlan, NewRequest
from esp_core.sched.prefix_cache import block_hash_chain
from esp_serve.app.calibration import Calibrator, make_cost_model, model_shape
from esp_serve.app.config import AppConfig, context_error, load_config
from esp_serve.app.dispatch import ResultCombiner
from esp_serve.app.engine_loop import EngineLoop
from esp_serve.app.event_channel import ChannelAddress, EventServer, send_data, send_end
from esp_serve.app.failures import RecoveryRate, RetryLedger
from esp_serve.app.gc_tuning import freeze_startup_heap
from esp_serve.app.instance_group import (
    all_actors,
    join_world_group,
    needs_world_group,
    open_channels,
    start_instances,
)
from esp_serve.app.observer import EngineObserver
from esp_serve.app.outbox import Outboxes
from esp_serve.app.placement import group_topology
from esp_serve.app.plan_channel import TOKEN_BYTES
from esp_serve.app.protocol import (
    Admission,
    GenerateRequest,
    GroupStatus,
    InstanceKV,
    ModelInfo,
    Pin,
    TokenEvent,
)
from esp_serve.app.recovery import GroupRecovery
from esp_serve.app.saturation import GroupLoad
from esp_serve.app.telemetry import TracingConfig

log = logging.getLogger("ray.serve")

# how often the controller checks that its engine loop still runs (`_watch_loop`)
LIVENESS_CHECK_S = 5.0
# Gauges are re-sent this often even when nothing changes: Ray's metrics agent drops a
# gauge series that was not reported for ~2 export intervals, so an idle group's
# running/waiting/KV gauges would vanish from the scrape instead of reading 0.
GAUGE_REFRESH_S = 1.0
# an ingress's subscription ends after this long without an unfinished request, so that
# an idle group has no ongoing call and Serve can drain it at once
SUBSCRIPTION_IDLE_S = 2.0
# an ingress connects to the event channel it was given within this, or the call fails
SUBSCRIBE_CONNECT_S = 30.0


def own_replica_id(fallback: str) -> str:
    """This replica's id as the request router knows it (`fallback` outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not a Serve replica (tools, tests)
        return fallback


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


class ESPController(EngineLoop, GroupRecovery):
    """The deployment class (decorated with serve.deployment in app/builder.py)."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = load_config(config)
        t0 = time.monotonic()
        self.group_id = uuid.uuid4().hex[:8]
        self.replica_id = own_replica_id(self.group_id)
        # ranks[i]: the actors of instance i, one per TP rank; instances[i]: its TP rank 0,
        # which answers for it (results, KV state, model info)
        self.ranks = start_instances(self.cfg, self.group_id)
        self.instances = [r[0] for r in self.ranks]
        timeout = self.cfg.cluster.instance_start_timeout_s
        await asyncio.wait_for(asyncio.gather(*(a.ready.remote() for a in all_actors(self.ranks))), timeout)
        # channels[i][r]: the plan channel of instance i's TP rank r (app/plan_channel.py);
        # only this controller holds the token its instances accept
        self._plan_token = secrets.token_bytes(TOKEN_BYTES)
        self.channels = list(
            await asyncio.gather(*(open_channels(r, self._plan_token, timeout) for r in self.ranks))
        )
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
            self._set_placement(cost)  # before the scheduler reads it
        s = self.cfg.scheduler
        self.calibrator = (
            Calibrator(
                cost,
                s.calibration_interval_s,
                s.calibration_min_records,
                s.save_profile,
                tp=self.cfg.cluster.tensor_parallel_size,
            )
            if cost is not None
            else None
        )
        self.scheduler = self._new_scheduler()
        # metrics (Ray's Prometheus export) and traces (off unless telemetry.tracing says)
        self.obs = EngineObserver(
            self.info.served_name, self.group_id, TracingConfig.from_section(self.cfg.telemetry)
        )
        self._kv_total = self.cfg.cluster.kv_slots_per_instance
        # (free, cached) slots per instance last sent to the metrics
        self._kv_reported: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._observe_kv()
        if needs_world_group(self.cfg, len(self.ranks)):
            await join_world_group(self.ranks, self.cfg, self.group_id)
        self.max_waiting = self.cfg.scheduler.max_waiting_requests
        # each unfinished request's events, per ingress replica, until its subscription
        # takes them (app/outbox.py)
        self._streams = Outboxes()
        self._awaiting_first: set[str] = set()  # the bounded queue: no token yet
        self._requests: dict[str, NewRequest] = {}  # unfinished, to re-queue after a fault
        self._started: set[str] = set()  # requests some instance has state or KV for
        self._wake = asyncio.Event()
        # where ingresses receive their subscriptions' events (started by the first)
        self._events = EventServer(ray.util.get_node_ip_address())
        self._shutting_down = False
        self._loop_error: BaseException | None = None
        self._recovery: asyncio.Task | None = None
        self.recoveries = 0
        # failure accounting (app/failures.py): retries per request, rebuilds per minute
        self.ledger = RetryLedger(self.cfg.recovery.request_retries)
        self.recovery_rate = RecoveryRate(self.cfg.recovery.max_recoveries_per_minute)
        self._placed: dict[str, set[int]] = {}  # request -> instances with its state or KV
        # how many prefill batches ran at each DoP, decode steps at each instance count
        self.prefill_dops: collections.Counter[int] = collections.Counter()
        self.decode_widths: collections.Counter[int] = collections.Counter()
        self.lookahead_steps = 0  # decode steps sent while the step before them ran
        self._reset_execution()
        # the startup heap out of every later full collection (app/gc_tuning.py)
        frozen = freeze_startup_heap()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop())
        self._gauge_task = asyncio.get_running_loop().create_task(self._refresh_gauges())
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

    def _set_placement(self, cost: CostModel | None) -> None:
        """Tell the cost model which node each instance landed on, so it charges the
        network only to batches whose instances span nodes (app/placement.py)."""
        pg = ray.util.get_current_placement_group()
        if cost is None or pg is None:
            return  # local policy, or run outside a placement group (tools)
        topology = group_topology(pg)
        cost.set_placement(topology.node_of)
        log.info(
            "ESP group %s placement: %d node(s), ring %s, %d cross-node pairs",
            self.group_id,
            len(set(topology.node_of)),
            topology.ring,
            len(topology.cross_pairs),
        )

    def _new_scheduler(self) -> Scheduler:
        cost = self.calibrator.model if self.calibrator else None
        return make_scheduler(self.cfg, self.info.max_model_len, self.info.eos_token_ids, cost)

    def _reset_execution(self) -> None:
        """Per-instance dispatch state; a new generation ignores results of the old one."""
        self._generation = getattr(self, "_generation", 0) + 1
        n = len(self.instances)
        self._queues: list[collections.deque[IterationPlan]] = [collections.deque() for _ in range(n)]
        # per instance: sub-plans sent and not answered (batch ids, their result's task),
        # and how many were sent in this generation (their sequence, app/plan_order.py)
        self._outstanding: list[collections.deque[tuple[list[int], asyncio.Task]]] = [
            collections.deque() for _ in range(n)
        ]
        self._sent: list[int] = [0] * n
        self._combiner = ResultCombiner()
        # batches in flight: their requests (charged if one fails) and instances
        self._batch_requests: dict[int, tuple[str, ...]] = {}
        self._batch_instances: dict[int, tuple[int, ...]] = {}
        if self.calibrator is not None:
            self.calibrator.forget_pending()  # batches of the old group never report

    def _model_info(self, arch: dict[str, Any]) -> ModelInfo:
        from esp_core.tokenizer import load_tokenizer

        max_ctx = arch["max_context_len"]
        max_len = self.cfg.model.max_model_len or max_ctx
        if max_len > max_ctx:
            scaled = self.cfg.model.rope_scaling is not None
            raise ValueError("model.max_model_len " + context_error(max_len, max_ctx, scaled))
        tokenizer = load_tokenizer(self.cfg.model.tokenizer_path)
        eos = tuple(dict.fromkeys((*arch["eos_token_ids"], *tokenizer.eos_token_ids)))
        return ModelInfo(self.cfg.model.name, arch["vocab_size"], max_len, eos)

    # ------------------------------------------------------------------ public methods

    async def model_info(self) -> ModelInfo:
        return self.info

    async def submit(self, request: GenerateRequest) -> Admission:
        """Admit a request (or say why not) and return at once; its events go to the
        subscription of `request.ingress_id`. From here on the request is given up (its KV
        back to the pool) in `_untrack`: finished, failed, cancelled, or its ingress gone."""
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        sampling = request.sampling
        if sampling.seed is None:  # fixed for the request's lifetime (plan.SamplingParams)
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(62))
        prompt = tuple(request.prompt_token_ids)
        new = NewRequest(
            request.request_id,
            prompt,
            sampling,
            arrival_time=time.monotonic(),
            block_hashes=self._block_hashes(request),
            prefill_after=request.prefill_after,
        )
        try:
            self.scheduler.add_request(new, new.arrival_time)
        except RequestRejected as err:
            return Admission(False, 400, err.code, str(err))
        self._track(new, request)
        return Admission(True, replica_id=self.replica_id)

    def _refusal(self) -> Admission | None:
        """Why no request can be admitted now (None: it can)."""
        retry = self.cfg.server.retry_after_s
        if self._loop_error is not None or self._shutting_down:
            why = "is shutting down" if self._shutting_down else "failed and is restarting"
            return Admission(False, 503, "unavailable", f"the ESP group {why}", retry_after_s=retry)
        if len(self._awaiting_first) >= self.max_waiting:
            return Admission(
                False,
                503,
                "queue_full",
                f"The server is overloaded: {len(self._awaiting_first)} requests are "
                "waiting (scheduler.max_waiting_requests); retry later.",
                retry_after_s=retry,
            )
        return None

    async def subscribe(self, pin: Pin, ingress_id: str) -> AsyncIterator[ChannelAddress]:
        """The events of every request `ingress_id` submitted here. The call yields one
        item, the address of an event channel (app/event_channel.py), on which each
        engine step with news is one frame ({request_id: [TokenEvent, ...]}); it lasts
        as long as the channel, so Serve sees the ingress's requests as ongoing here.
        Ends by itself after SUBSCRIPTION_IDLE_S without unfinished requests (the ingress
        subscribes again on its next submit); cancelled or disconnected (the ingress is
        gone), it aborts that ingress's requests."""
        if pin.replica_id != self.replica_id:  # the pinned replica is gone: say so
            raise RuntimeError(f"controller replica {pin.replica_id} is gone")
        await self._events.start()
        address, connected = self._events.expect()
        box = self._streams.box(ingress_id)
        ending = ended = False
        writer = watcher = None
        try:
            yield address
            reader, writer = await asyncio.wait_for(connected, SUBSCRIBE_CONNECT_S)
            # the ingress closing its end (it died) cancels this call at once, even while
            # no event is due; not once the subscription is ending by itself
            task = asyncio.current_task()
            watcher = asyncio.ensure_future(reader.read())
            watcher.add_done_callback(lambda _: None if ending or task is None else task.cancel())
            while True:
                ready = await box.next_ready(SUBSCRIPTION_IDLE_S)
                if ready is None:
                    ending = True
                    await send_end(writer)
                    ended = True
                    return
                await send_data(writer, ready)
        finally:
            ending = True
            self._events.forget(address)
            if watcher is not None:
                watcher.cancel()
            if writer is not None:
                writer.close()
            if not ended:
                for rid in self._streams.requests_of(ingress_id):
                    self._untrack(rid, finished=False)
            self._streams.drop_if_idle(ingress_id)

    async def cancel(self, pin: Pin, request_id: str) -> None:
        """Abort a request (client gone, stop string seen) and free its KV; a no-op when
        it already finished or the pin names another replica."""
        if pin.replica_id == self.replica_id:
            self._untrack(request_id, finished=False)

    def _track(self, new: NewRequest, request: GenerateRequest) -> None:
        rid = new.request_id
        self._streams.add(rid, request.ingress_id)
        self._awaiting_first.add(rid)
        self._requests[rid] = new
        self.obs.on_request_arrived(rid, len(new.prompt_token_ids), request.trace_context, new.arrival_time)
        self._wake.set()

    def _emit(self, rid: str, event: TokenEvent) -> None:
        """Send an event to the request's ingress; its last event (finish_reason set)
        ends the request here."""
        if event.finish_reason is not None:
            self._awaiting_first.discard(rid)
        self._streams.emit(rid, event)

    def _untrack(self, rid: str, finished: bool) -> None:
        known = self._streams.discard(rid)
        self._awaiting_first.discard(rid)
        if known and not finished:  # the caller went away (disconnect, stop string): free the KV
            now = time.monotonic()
            self.obs.on_aborted(rid, now)
            self.scheduler.abort_request(rid, now)
            self._forget(rid)
            self._wake.set()

    async def _watch_loop(self) -> None:
        """Belt and braces for waiting streams: if the engine loop ever ends without
        ending them (every known way out does: `_fail_all`, `__del__`), end them here
        rather than let a request wait on a stopped group. One check per
        LIVENESS_CHECK_S, not a timeout per token."""
        while not self._shutting_down:
            await asyncio.sleep(LIVENESS_CHECK_S)
            if self._loop_task.done() and self._loop_error is None and not self._shutting_down:
                message = "the ESP group serving this request stopped; retry it"
                self._fail_all(RuntimeError("the engine loop ended"), message)
                return

    async def _refresh_gauges(self) -> None:
        """Re-send every gauge once per GAUGE_REFRESH_S, changed or not."""
        while not self._shutting_down:
            await asyncio.sleep(GAUGE_REFRESH_S)
            self.obs.metrics.resend_gauges()

    def _block_hashes(self, request: GenerateRequest) -> tuple[int, ...]:
        """The prompt's block hash chain for the prefix cache, as the ingress hashed it
        (off this loop); () when the cache is off. A caller that sent none (or a chain of
        another length: another block size) gets it hashed here."""
        if not self.scheduler.prefix_cache_enabled:
            return ()
        block_tokens = self.cfg.prefix_cache.block_tokens
        hashes = request.block_hashes
        if len(hashes) != len(request.prompt_token_ids) // block_tokens:
            hashes = block_hash_chain(request.prompt_token_ids, block_tokens)
        return hashes

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
            "stopped": self._loop_error is not None,
            "failures": self.ledger.summary(),
            "tensor_parallel_size": self.cfg.cluster.tensor_parallel_size,
            "instances_answering": len(kv),
            "memory_per_instance": list(self.memory_plans),
            "prefill_dop_counts": {str(k): v for k, v in sorted(self.prefill_dops.items())},
            "decode_width_counts": {str(k): v for k, v in sorted(self.decode_widths.items())},
            "decode_lookahead_steps": self.lookahead_steps,
        }
        extra["scheduler_stats"] = dict(self.scheduler.stats)
        extra["prefix_cache"] = self.scheduler.prefix_cache_stats()
        if self.calibrator is not None:
            extra["cost_model"] = {
                "source": self.calibrator.model.source,
                "records": len(self.calibrator.records),
                "refits": self.calibrator.refits,
                # nodes the group's instances are on (None: placement unknown)
                "nodes": len(set(node_of)) if (node_of := self.calibrator.model.node_of) else None,
            }
        return GroupStatus(
            instances=kv,
            scheduler_free_slots=tuple(self.scheduler.kv_free_slots()),
            waiting=len(self._awaiting_first),
            running=len(self._streams) - len(self._awaiting_first),
            extra=extra,
            cached_slots=tuple(self.scheduler.cached_kv_per_instance()),
        )

    def load(self) -> GroupLoad:
        """The group's KV demand (app/saturation.py), from the scheduler's accounting."""
        # KV of prefix-cache entries is evicted whenever it is needed: free for routing
        used = sum(self._kv_total - f for f in self.scheduler.kv_free_slots())
        used -= sum(self.scheduler.cached_kv_per_instance())
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

    async def record_routing_stats(self) -> dict[str, float]:
        """Serve polls this for the request router (app/routing.py). A coroutine, so it
        runs on the engine's event loop: Serve runs a plain method in a worker thread,
        which read the scheduler's state while the loop changed it (and started a thread
        per poll)."""
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
        ended = len(self._streams)
        for rid in self._streams:
            self.obs.on_failed(rid, message, now)
            self._emit(rid, TokenEvent(None, finish_reason="error", error=message))
        for _ in range(3):  # let the subscriptions forward the last events
            await asyncio.sleep(0)
        self._loop_task.cancel()
        self._watch_task.cancel()
        self._gauge_task.cancel()
        self._events.close()
        self.obs.shutdown()
        log.info("ESP group %s shut down (%d streams ended early)", self.group_id, ended)

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
        tp = self.cfg.cluster.tensor_parallel_size
        answers = await asyncio.gather(
            *(asyncio.wait_for(a.ready.remote(), 20) for a in all_actors(self.ranks)), return_exceptions=True
        )
        # world rank -> instance (a lost TP rank loses its whole instance)
        dead = {r // tp for r, a in enumerate(answers) if isinstance(a, RayActorError)}
        if dead:
            self._instances_lost(dead, "health check")
        for a in answers:
            if isinstance(a, BaseException) and not isinstance(a, RayActorError):
                raise a

    def _check_loop(self) -> None:
        if self._loop_task.done() or self._loop_error is not None:
            raise RuntimeError(f"scheduler loop stopped: {self._loop_error!r}")
