"""Decode narrowing over HTTP: a prompt chunked over both instances of a group (its KV
spread by the chunks) is gathered onto one instance for decode by KV migrations, and its
greedy tokens still equal a single in-process InstanceWorker's. Its own small app
(chunks of 512 tokens, the analytical CPU cost model: no refit), deleted by the test."""

from __future__ import annotations

import pytest

from tests.live.test_esp_serving import completion, prompt_ids, token_ids
from tests.serve_session import ServeClient
from tests.support.live_config import tiny_group_config

pytestmark = pytest.mark.slow

KV = 4096
MODEL = "narrow-test"
CONFIG = tiny_group_config(MODEL, KV, num_instances=2)
CONFIG["scheduler"].update(chunk_tokens=512, narrow_decode_groups=True)


def test_a_chunk_spread_prompt_decodes_on_one_instance_with_the_same_tokens():
    from esp_core.runtime.config import WorkerConfig
    from esp_core.runtime.worker import InstanceWorker
    from tests.serve_session import deploy, release
    from tests.support.runtime import generate

    base, timings = deploy("narrow", "/narrow", CONFIG)
    server = ServeClient(base, "unused", timings, kv_slots=KV, num_instances=2)  # (no keys)
    try:
        ids = prompt_ids(1500, seed=5)  # three chunks, each kept half on either instance
        with server.http() as c:
            out = completion(c, ids, 24, model=MODEL)
        st = server.status()
        assert st["scheduler_stats"]["decode_narrowings"] == 1, st["scheduler_stats"]
        assert st["scheduler_stats"]["migrations"] >= 1
        assert st["prefill_dop_counts"].get("2", 0) >= 1, st["prefill_dop_counts"]
        # the step of the move spans both; every step after it runs on one instance
        assert st["decode_width_counts"].get("1", 0) >= 20, st["decode_width_counts"]
        worker = InstanceWorker(WorkerConfig(model="builtin", kv_slots=2048, num_threads=1))
        assert token_ids(out["choices"][0]) == generate(worker, {"r": ids}, max_new_tokens=24)["r"]
        server.wait_pool_free()
    finally:
        release("narrow")
