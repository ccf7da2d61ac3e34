"""Smoke test: the builtin model prefills and decodes greedily through InstanceWorker."""

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from tests.support.runtime import generate


def test_builtin_greedy_generation_runs_and_frees_slots():
    worker = InstanceWorker(WorkerConfig(kv_slots=256))
    prompts = {"a": [256, *b"Hello"], "b": [256, *b"Hi there"]}
    out = generate(worker, prompts, 6)
    assert {len(v) for v in out.values()} == {6}
    assert all(0 <= t < 258 for v in out.values() for t in v)
    assert worker.kv_free_slots() == 256
