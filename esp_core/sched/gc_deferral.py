"""Automatic garbage collection held back while a plan is decided and sent.

A young (generation-0) collection starts on whichever allocation crosses the
threshold, and what it scans is mostly the prompt-id tuples of requests that arrived
since the last one (a tuple of ints is scanned until its first collection untracks
it): 1-3 ms when a few hundred thousand prompt tokens arrived, measured with
`python -m esp_core.sched.bench`. A prefill round allocates hundreds of objects, so the
collection usually lands inside `schedule()`, and every batch of that plan -- decode
steps included -- starts that much later.

`deferred_collections()` pauses automatic collection for the block that decides and
dispatches a plan; the collection that was due runs on the first allocation after it,
once the plan's batches are on their way to the instances. It is moved, not removed:
it can still delay the handling of a batch that completes during it. Nothing is leaked:
the allocation counts carry over, so the next collection covers everything allocated
inside the block.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_collections() -> Iterator[None]:
    """No automatic collection inside the block (a collection already paused by the
    caller stays paused after it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
