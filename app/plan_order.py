"""Sub-plans of one instance run in the order the controller sent them.

With decode look-ahead (esp_core/sched/lookahead.py) the controller has up to two
sub-plans outstanding per instance, and the second's input is what the first samples.
They arrive in order on the instance's plan channel (app/plan_channel.py), but `reset`
comes as a Ray call on another thread, so each sub-plan carries the controller's
generation and a per-instance sequence number, and `PlanTurns.turn` lets one run only
when every earlier one of its generation has run:

* a higher generation (the controller rebuilt the group) starts a new sequence at 0
  once nothing runs; a sub-plan of a lower one is refused (`StaleSubPlan`): its
  results would be ignored, and the instance was reset since;
* `exclusive` (the instance's `reset`) waits for the running sub-plan, then raises the
  generation, so waiting sub-plans of the old one are refused too;
* a sub-plan whose turn does not come within `wait_s` fails (`SequenceGap`) instead of
  holding a thread forever; the controller's watchdog, whose limit for a sub-plan
  includes the one ahead of it, has replaced the instance long before.

Plain threading, no Ray: tests/app/test_plan_order.py runs it with threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_WAIT_S = 900.0


class StaleSubPlan(RuntimeError):
    """A sub-plan of a generation the instance has left (reset since)."""


class SequenceGap(RuntimeError):
    """An earlier sub-plan never arrived."""


class PlanTurns:
    def __init__(self, wait_s: float = DEFAULT_WAIT_S) -> None:
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._generation = 0
        self._next = 0  # sequence number of the sub-plan whose turn it is
        self._running = False

    @contextmanager
    def turn(self, generation: int, seq: int) -> Iterator[None]:
        """Run the body as sub-plan `seq` of `generation`, after all earlier ones."""
        with self._cond:
            deadline = time.monotonic() + self.wait_s
            while not self._my_turn(generation, seq):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SequenceGap(
                        f"sub-plan {seq} of generation {generation} waited {self.wait_s:.0f}s "
                        f"for sub-plan {self._next}"
                    )
                self._cond.wait(left)
            self._running = True
        try:
            yield
        finally:
            with self._cond:
                self._running = False
                self._next += 1
                self._cond.notify_all()

    def _my_turn(self, generation: int, seq: int) -> bool:
        if generation < self._generation:
            raise StaleSubPlan(
                f"sub-plan {seq} of generation {generation}: the instance is at {self._generation}"
            )
        if self._running:
            return False
        if generation > self._generation:  # the controller's new sequence
            self._generation, self._next = generation, 0
        return seq == self._next

    @contextmanager
    def exclusive(self, generation: int) -> Iterator[None]:
        """Run the body alone (no sub-plan runs meanwhile); sub-plans of generations
        below `generation` are refused from now on."""
        with self._cond:
            while self._running:
                self._cond.wait()
            self._running = True
            if generation > self._generation:
                self._generation, self._next = generation, 0
            self._cond.notify_all()  # waiting sub-plans of older generations give up
        try:
            yield
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()
