"""Fault recovery of an ESP group (a mixin of `ESPController`, app/controller.py).

A dead or hung instance, or a failed batch, charges a retry to the requests it concerns
(app/failures.py: the unproven ones of the batch, or with KV on the instance); those
past `recovery.request_retries` fail alone with an error naming the cause. Every other
unfinished request goes to a fresh scheduler (resumed over the tokens it already
streamed), except suspects, which re-enter one at a time (their trial). Then dead
instances are replaced in their bundles, the survivors cleared and the world group
re-formed. More than `recovery.max_recoveries_per_minute` rebuilds stop the group: its
requests fail and health checks fail, so Serve replaces the replica."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import ray

from esp_core.sched.interface import RequestRejected
from esp_core.sched.plan import BatchResult
from esp_serve.app.failures import cause_of, retries_exhausted_message, too_many_recoveries_message
from esp_serve.app.instance_group import (
    join_world_group,
    needs_world_group,
    open_channels,
    replace_instance,
    reset_instances,
)
from esp_serve.app.protocol import TokenEvent

log = logging.getLogger("ray.serve")


class GroupRecovery:
    """Fault recovery of `ESPController` (its state lives there; see the module doc)."""

    # ---------------------------------------------------------------- what failed

    def _batches_failed(self, instance: int, failed: list[BatchResult]) -> None:
        rids = [rid for r in failed for rid in self._batch_requests.get(r.batch_id, ())]
        where = f"batch {failed[0].batch_id} failed on instance {instance}: {failed[0].error}"
        self._start_recovery(set(), where, rids, cause_of(failed[0].error))

    def _instances_lost(self, dead: set[int], where: str) -> None:
        self._start_recovery(dead, where, self._requests_on(dead), "RayActorError")

    def _instance_hung(self, instance: int, batch_ids: list[int], limit_s: float) -> None:
        """The watchdog: a sub-plan ran past its limit. Its instance, and the peers of its
        batches (stuck in a transfer with it), are killed whatever they are stuck in and
        replaced; its batches count as failed."""
        stuck = {instance} | {i for b in batch_ids for i in self._batch_instances.get(b, ())}
        log.error(
            "instance %d ran a plan for more than %.1fs (the watchdog): replacing instances %s",
            instance,
            limit_s,
            sorted(stuck),
        )
        for i in stuck:
            for actor in self.ranks[i]:  # every TP rank of the instance
                ray.kill(actor, no_restart=True)
        rids = [rid for b in batch_ids for rid in self._batch_requests.get(b, ())]
        rids += self._requests_on(stuck)
        self._start_recovery(stuck, f"watchdog after {limit_s:.1f}s", rids, "WatchdogTimeout")

    def _requests_on(self, instances: set[int]) -> list[str]:
        """Requests with state or KV on any of `instances`."""
        return [rid for rid, where in self._placed.items() if where & instances]

    # ---------------------------------------------------------------- recovery

    def _start_recovery(
        self, dead: set[int], where: str, charged: Iterable[str] = (), cause: str = ""
    ) -> None:
        if self._recovery is not None or self._loop_error is not None:
            return  # already rebuilding (the old group's results are ignored), or stopped
        now = time.monotonic()
        if not self.recovery_rate.allow(now):
            self._give_up(where)
            return
        log.error(
            "ESP group %s: %s; rebuilding (instances %s to replace)", self.group_id, where, sorted(dead)
        )
        self._charge(charged, cause, now)
        if dead:
            message = (
                f"instance(s) {sorted(dead)} of the ESP group died; the request's KV cache was lost: retry it"
            )
        else:
            # the cause class only: `where` (in the log) holds the instance's error text
            message = f"the ESP group was rebuilt after a failed batch ({cause or 'error'}); retry it"
        self._requeue_requests(message)
        self._recovery = asyncio.get_running_loop().create_task(self._recover(dead))

    def _charge(self, request_ids: Iterable[str], cause: str, now: float) -> None:
        """One retry charged (app/failures.py); a request past its budget fails alone."""
        ids = [rid for rid in request_ids if rid in self._requests]
        for rid in self.ledger.charge(ids):
            failures = self.ledger.failures(rid)
            log.error(
                "request %s: failed %d times (last cause %s, recovery.request_retries=%d): not retried",
                rid,
                failures,
                cause,
                self.cfg.recovery.request_retries,
            )
            self._fail_request(rid, retries_exhausted_message(cause or "error", failures), now)

    def _give_up(self, where: str) -> None:
        message = too_many_recoveries_message()
        log.error(
            "ESP group %s: more than %d rebuilds in a minute, stopping; last failure: %s",
            self.group_id,
            self.cfg.recovery.max_recoveries_per_minute,
            where,
        )
        self._fail_all(RuntimeError(f"too many recoveries; last: {where}"), message)

    def _requeue_requests(self, message: str) -> None:
        """Every unfinished request goes to a fresh scheduler but suspects waiting for
        their trial. One that already streamed tokens is resumed: re-prefilled over prompt
        + those tokens, it continues to its max_tokens (the client sees no gap and no
        repeat)."""
        self._generation += 1  # results of the old group are ignored from now
        old, self.scheduler = self.scheduler, self._new_scheduler()
        self._placed.clear()
        now = time.monotonic()
        for rid in list(self._requests):
            # the tokens it streamed: the old scheduler's, or kept since it was held
            outputs = old.output_ids(rid)
            if outputs is None:
                outputs = self.ledger.streamed.pop(rid, [])
            if self.ledger.is_held(rid):
                self.ledger.streamed[rid] = outputs
            else:
                self._resume(rid, outputs, message, now)
        self._admit_trial(now)

    def _resume(self, rid: str, outputs: list[int], message: str, now: float) -> None:
        req = self._requests[rid]
        try:
            self.scheduler.add_resumed_request(req, outputs, now)
        except RequestRejected as err:
            self._fail_request(rid, f"{message} ({err})", now)
            return
        self._started.discard(rid)  # started again when its re-prefill is planned

    def _admit_trial(self, now: float) -> None:
        """Let the next suspect into the scheduler (one at a time: app/failures.py)."""
        rid = self.ledger.next_trial()
        while rid is not None and rid not in self._requests:
            self.ledger.forget(rid)
            rid = self.ledger.next_trial()
        if rid is None:
            return
        log.warning("request %s: resumed alone after %d failure(s)", rid, self.ledger.failures(rid))
        self._resume(rid, self.ledger.streamed.pop(rid, []), "the request could not be resumed", now)
        self._wake.set()

    def _fail_request(self, rid: str, message: str, now: float) -> None:
        req = self._requests[rid]
        self._forget(rid)
        self.obs.on_failed(rid, message, now)
        self._emit(
            rid,
            TokenEvent(
                None, finish_reason="error", error=message, num_prompt_tokens=len(req.prompt_token_ids)
            ),
        )

    async def _recover(self, dead: set[int]) -> None:
        """Replace dead instances in their bundles, clear the survivors, re-form the world
        group. Until it is done, new requests queue in the fresh scheduler."""
        t0 = time.monotonic()
        c = self.cfg.cluster
        try:
            survivors = [i for i in range(len(self.ranks)) if i not in dead]
            # a survivor finishes (or fails) its current plan before `reset` runs; one whose
            # ranks do not all answer in time is replaced too (all its TP ranks)
            dead |= await reset_instances(self.ranks, survivors, c.group_init_timeout_s, self._generation)
            for i in sorted(dead):
                replace_instance(self.cfg, self.ranks, i, self.group_id + f"r{self.recoveries + 1}")
                self.instances[i] = self.ranks[i][0]
            replaced = [a for i in dead for a in self.ranks[i]]
            await asyncio.wait_for(
                asyncio.gather(*(a.ready.remote() for a in replaced)), c.instance_start_timeout_s
            )
            for i in sorted(dead):  # the old processes' channels are closed already
                for channel in self.channels[i]:
                    channel.close()
                self.channels[i] = await open_channels(
                    self.ranks[i], self._plan_token, c.instance_start_timeout_s
                )
            if needs_world_group(self.cfg, len(self.ranks)):
                await join_world_group(self.ranks, self.cfg, self.group_id)
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
