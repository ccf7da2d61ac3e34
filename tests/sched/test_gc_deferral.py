"""Automatic collection paused around a decision: none inside the block, the one that
fell due runs once it ends, and a pause the caller set stays."""

from __future__ import annotations

import gc

from esp_core.sched.gc_deferral import deferred_collections


class _Cycle:
    def __init__(self) -> None:
        self.me = self


class _CollectionCounter:
    """Counts the collections that start while it is installed."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.count += 1


def test_no_collection_inside_and_the_due_one_runs_after():
    assert gc.isenabled()
    threshold = gc.get_threshold()[0]
    counter = _CollectionCounter()
    gc.callbacks.append(counter)
    try:
        with deferred_collections():
            assert not gc.isenabled()
            for _ in range(5 * threshold):
                _Cycle()  # cyclic garbage: only a collection frees it
            inside = counter.count
        [_Cycle() for _ in range(2)]  # the first allocations after the block
        after = counter.count
    finally:
        gc.callbacks.remove(counter)
    assert inside == 0
    assert gc.isenabled()
    assert after >= 1  # what fell due inside was collected once the block ended


def test_a_pause_set_by_the_caller_stays():
    gc.disable()
    try:
        with deferred_collections():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collection_resumes_when_the_block_raises():
    try:
        with deferred_collections():
            raise ValueError("scheduler bug")
    except ValueError:
        pass
    assert gc.isenabled()
