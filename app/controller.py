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
import dataclasses
import logging
import random
import time
from typing import Any, AsyncIterator

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from app.config import AppConfig, load_config
from app.dispatch import OutputHistory, ResultCombiner, sub_plan
from app.instance import ElasticInstance
from app.protocol import Admission, GenerateRequest, GroupStatus, ModelInfo, TokenEvent
from esp_core.sched.interface import RequestEvent, RequestRejected, Scheduler
from esp_core.sched.plan import BatchResult, IterationPlan, NewRequest

log = logging.getLogger("ray.serve")


def make_scheduler(cfg: AppConfig, max_model_len: int, eos_token_ids: tuple[int, ...]
                   ) -> Scheduler:
    """The policy named by `scheduler.policy` (only "local" so far)."""
    if cfg.scheduler.policy == "local":
        from esp_core.sched.local import LocalScheduler

        return LocalScheduler(cfg.cluster_spec(),
                              cfg.local_scheduler_config(max_model_len, eos_token_ids))
    raise ValueError(f"unknown scheduler policy {cfg.scheduler.policy!r}")


def start_instances(cfg: AppConfig) -> list[Any]:
    """One ElasticInstance per bundle 1..N of the replica's placement group (or plain
    actors with the same resources when run outside a placement group, e.g. in tools)."""
    pg = ray.util.get_current_placement_group()
    res = dict(cfg.cluster.instance_resources)
    num_cpus, num_gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
    n = cfg.cluster.num_instances
    actors = []
    for rank in range(n):
        options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, resources=res,
                                       max_restarts=0)
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank + 1)
        actors.append(ElasticInstance.options(**options).remote(cfg.worker_kwargs(), rank, n))
    return actors


class ESPController:
    """The deployment class (decorated with serve.deployment in app/builder.py)."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = load_config(config)
        t0 = time.monotonic()
        self.instances = start_instances(self.cfg)
        timeout = self.cfg.cluster.instance_start_timeout_s
        await asyncio.wait_for(asyncio.gather(*(a.ready.remote() for a in self.instances)),
                               timeout)
        arch = await asyncio.wait_for(self.instances[0].model_info.remote(), timeout)
        self.info = self._model_info(arch)
        self.scheduler = make_scheduler(self.cfg, self.info.max_model_len,
                                        self.info.eos_token_ids)
        self.max_waiting = self.cfg.scheduler.max_waiting_requests
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._awaiting_first: set[str] = set()  # the bounded queue: no token yet
        self._history = OutputHistory()
        self._combiner = ResultCombiner()
        self._wake = asyncio.Event()
        self._loop_error: BaseException | None = None
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        log.info("ESP group up: %d instances in %.1fs, model %s, max_model_len %d",
                 len(self.instances), time.monotonic() - t0, self.info.served_name,
                 self.info.max_model_len)

    def _model_info(self, arch: dict[str, Any]) -> ModelInfo:
        from esp_core.tokenizer import load_tokenizer

        max_ctx = arch["max_context_len"]
        max_len = self.cfg.model.max_model_len or max_ctx
        if max_len > max_ctx:
            raise ValueError(f"model.max_model_len {max_len} exceeds the model's context of "
                             f"{max_ctx} tokens: lower it or remove it")
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
        if self._loop_error is not None:
            yield Admission(False, 503, "unavailable", "the ESP group failed and is restarting",
                            retry_after_s=self.cfg.server.retry_after_s)
            return
        if len(self._awaiting_first) >= self.max_waiting:
            yield Admission(False, 503, "queue_full",
                            f"The server is overloaded: {len(self._awaiting_first)} requests are "
                            "waiting (scheduler.max_waiting_requests); retry later.",
                            retry_after_s=self.cfg.server.retry_after_s)
            return
        sampling = request.sampling
        if sampling.seed is None:  # fixed for the request's lifetime (plan.SamplingParams)
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(62))
        try:
            self.scheduler.add_request(
                NewRequest(rid, tuple(request.prompt_token_ids), sampling, arrival_time=now),
                now)
        except RequestRejected as err:
            yield Admission(False, 400, err.code, str(err))
            return
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[rid] = queue
        self._awaiting_first.add(rid)
        self._history.add_request(rid, len(request.prompt_token_ids))
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
                self.scheduler.abort_request(rid, time.monotonic())
                self._history.forget(rid)
                self._wake.set()

    async def status(self) -> GroupStatus:
        kv = await asyncio.wait_for(
            asyncio.gather(*(a.kv_state.remote() for a in self.instances)), 30)
        return GroupStatus(
            instances=tuple(kv), scheduler_free_slots=tuple(self.scheduler.kv_free_slots()),
            waiting=len(self._awaiting_first),
            running=len(self._streams) - len(self._awaiting_first),
            extra={"unfinished": self.scheduler.has_unfinished(),
                   "batches_in_flight": self._combiner.pending()})

    async def health(self) -> bool:
        self._check_loop()
        return True

    async def check_health(self) -> None:
        """Serve's periodic health check: the loop is alive and every instance answers
        (from its control group, so a long prefill does not fail it)."""
        self._check_loop()
        await asyncio.wait_for(asyncio.gather(*(a.ready.remote() for a in self.instances)), 20)

    def _check_loop(self) -> None:
        if self._loop_task.done() or self._loop_error is not None:
            raise RuntimeError(f"scheduler loop stopped: {self._loop_error!r}")

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                plan = self.scheduler.schedule(time.monotonic())
                if not plan.is_empty:
                    self._dispatch(plan)
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
        for queue in self._streams.values():
            queue.put_nowait(TokenEvent(None, finish_reason="error",
                                        error=f"scheduler failure: {err!r}"))
        if not self._loop_task.done():
            self._loop_task.cancel()

    def _dispatch(self, plan: IterationPlan) -> None:
        for batch in plan.batches():
            self._combiner.expect(batch)
        for i, actor in enumerate(self.instances):
            part = sub_plan(plan, i, self._history)
            if part is None:
                continue
            batch_ids = [b.batch_id for b in part.batches()]
            ref = actor.execute.remote(part)
            asyncio.get_running_loop().create_task(self._collect(i, ref, batch_ids))

    async def _collect(self, instance: int, ref: Any, batch_ids: list[int]) -> None:
        try:
            results: list[BatchResult] = await ref
            done = [self._combiner.add(instance, r) for r in results]
            missing = set(batch_ids) - {r.batch_id for r in results}
            done += [self._combiner.fail(instance, b, f"instance {instance} returned no result")
                     for b in missing]
        except Exception as err:  # the instance died or raised: its batches failed
            log.error("instance %d failed a plan: %r", instance, err)
            done = [self._combiner.fail(instance, b, f"instance {instance} failed: {err!r}")
                    for b in batch_ids]
        now = time.monotonic()
        try:
            for result in done:
                if result is not None:
                    self._route(self.scheduler.update(result, now))
        except Exception as err:
            self._fail_all(err)
        self._wake.set()

    def _route(self, events: list[RequestEvent]) -> None:
        for ev in events:
            if ev.token is not None:
                self._history.record(ev.request_id, ev.token.token_id)
            if ev.finish_reason is not None:
                self._history.forget(ev.request_id)
            queue = self._streams.get(ev.request_id)
            if queue is None:
                continue  # the stream was cancelled meanwhile
            self._awaiting_first.discard(ev.request_id)
            tok = ev.token
            queue.put_nowait(TokenEvent(
                token_id=tok.token_id if tok else None,
                logprob=tok.logprob if tok else None,
                top_logprobs=tok.top_logprobs if tok else (),
                finish_reason=ev.finish_reason.value if ev.finish_reason else None,
                error=ev.error, num_prompt_tokens=ev.num_prompt_tokens,
                num_output_tokens=ev.num_output_tokens))
