"""Garbage-collector setting of the controller process (the scheduler's host).

The controller is long-lived and its scheduler decides on the event loop that also
dispatches decode steps, so a collection that runs inside `schedule()` delays them.
After startup it calls `freeze_startup_heap()`: everything alive then -- imports, Ray
handles, config, the scheduler as built, ~100K objects -- moves to the permanent
generation, and full (generation-2) collections scan only what is allocated while
serving. A full collection over the startup heap alone costs ~50 ms CPU on the dev VM
(`import app.controller, app.ingress`: 94K tracked objects); frozen, ~0.

The thresholds stay at Python's defaults, measured with `python -m esp_core.sched.bench`
(docs/bench-scheduler.md): raising the generation-0 threshold (standard advice for
allocation-heavy servers) only makes each young collection bigger -- what it scans is
mostly new requests' prompt-id tuples (a tuple is scanned until its first collection
untracks it), so 10,000 instead of 700 turned 1-5 ms collections into 20-35 ms ones.
Generations 0-2 keep running on everything allocated after the freeze, so memory of
requests that come and go is reclaimed as before; only startup objects that become
cyclic garbage later are never collected (they are the process's long-lived core).

The engine step decides and dispatches each plan inside `deferred_collections()`
(esp_core/sched/gc_deferral.py): a young collection that falls due while the scheduler
decides -- 1-3 ms of prompt-id tuples after a burst of arrivals -- runs once the plan's
batches are sent instead of before.
"""

from __future__ import annotations

import gc

from esp_core.sched.gc_deferral import deferred_collections

__all__ = ["deferred_collections", "freeze_startup_heap"]


def freeze_startup_heap() -> int:
    """Collect once, then freeze everything alive. Returns the frozen object count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
