"""The controller's GC setting: the startup heap is frozen, later garbage is still
collected (no Ray needed)."""

from __future__ import annotations

import gc

from esp_serve.app.gc_tuning import freeze_startup_heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_moves_the_heap_out_and_new_garbage_is_still_collected():
    try:
        frozen = freeze_startup_heap()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
        assert gc.isenabled() and gc.get_threshold()[0] > 0  # collections still run
        for _ in range(100):
            _Cycle()  # cyclic garbage made after the freeze
        assert gc.collect() >= 100
    finally:
        gc.unfreeze()
