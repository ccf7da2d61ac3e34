"""Fault recovery of an ESP group (a mixin of `ESPController`, app/controller.py): a
dead instance or a failed multi-instance batch re-queues every unfinished request on a
fresh scheduler (resuming those that already streamed tokens), replaces dead instances
in their bundles, clears the survivors and re-forms the world group."""

from __future__ import annotations

import asyncio
import logging
import time

from esp_core.sched.interface import RequestRejected
from esp_serve.app.instance_group import (
    join_world_group,
    needs_world_group,
    replace_instance,
    reset_instances,
)
from esp_serve.app.protocol import TokenEvent

log = logging.getLogger("ray.serve")


class GroupRecovery:
    """Fault recovery of `ESPController` (its state lives there; see the module doc)."""

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
            survivors = [i for i in range(len(self.ranks)) if i not in dead]
            # a survivor finishes (or fails) its current plan before `reset` runs; one whose
            # ranks do not all answer in time is replaced too (all its TP ranks)
            dead |= await reset_instances(self.ranks, survivors, c.group_init_timeout_s)
            for i in sorted(dead):
                replace_instance(self.cfg, self.ranks, i, self.group_id + f"r{self.recoveries + 1}")
                self.instances[i] = self.ranks[i][0]
            replaced = [a for i in dead for a in self.ranks[i]]
            await asyncio.wait_for(
                asyncio.gather(*(a.ready.remote() for a in replaced)), c.instance_start_timeout_s
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
