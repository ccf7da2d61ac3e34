"""The defaults on a live group: the KV pool sized from a (small) memory budget, prefill
pieces bounded by the activation reserve, and chunked prefill serving short streams while
a long prompt prefills (behind a whole-prompt prefill they would wait for all of it)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from tests.serve_session import ServeClient

pytestmark = pytest.mark.slow

BUDGET_GIB = 0.2  # per instance: weights ~13 MiB, a workspace, then activations and KV
LONG_TOKENS = 12000
CONFIG = {
    "model": {"path": "builtin", "max_model_len": 16384},
    "cluster": {
        "num_instances": 2,
        # tiny CPU shares: the session's other apps already reserve most of Ray's 2 CPUs
        "instance_resources": {"CPU": 0.01},
        "controller_resources": {"CPU": 0.01},
        "memory_gib_per_instance": BUDGET_GIB,
        "num_threads_per_instance": 1,
        "group_init_timeout_s": 30,
        "comm_timeout_s": 120,
    },
    # the defaults otherwise: chunked prefill on
    "scheduler": {"policy": "esp", "calibration_interval_s": None},
    "server": {
        "api_keys_env": None,
        "ingress_max_replicas": 1,
        "ingress_num_cpus": 0.01,
        "request_timeout_s": 300,
    },
}


@pytest.fixture(scope="module")
def group():
    from tests.serve_session import deploy, release

    base, timings = deploy("chunk", "/chunk", CONFIG)
    client = ServeClient(base, "unused", timings, kv_slots=0, num_instances=2, timeout_s=300)
    client.kv_slots = client.status()["instances"][0]["total_slots"]  # what the budget gave
    yield client
    release("chunk")


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32, 127) for _ in range(n)]


async def _ttft(c, ids: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first streamed token, seconds to the end) of one completion."""
    body = {"model": "builtin", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.monotonic()
    first = None
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert "error" not in json.loads(line[6:]), line
                first = first or time.monotonic() - t0
    return first, time.monotonic() - t0


def test_status_shows_the_pool_each_instance_sized_from_its_budget(group):
    st = group.status()
    plans = st["memory_per_instance"]
    assert len(plans) == 2
    for plan, inst in zip(plans, st["instances"], strict=True):
        assert plan["budget_bytes"] == int(BUDGET_GIB * (1 << 30))
        assert plan["weight_bytes"] + plan["activation_bytes"] + plan["kv_bytes"] <= plan["budget_bytes"]
        assert inst["total_slots"] == plan["kv_slots"] >= 1024
        # the reserve holds less than the 16384-token chunk: pieces are cut to it
        assert 256 <= plan["piece_tokens"] < 16384


def test_long_prompt_is_chunked_to_the_piece_and_shorts_are_served_meanwhile(group):
    piece = min(p["piece_tokens"] for p in group.status()["memory_per_instance"])
    assert LONG_TOKENS > 2 * piece  # the prompt cannot run as one piece on one instance

    async def main():
        async with group.async_http() as c:
            alone = [await _ttft(c, _ids(40, 100 + i), 4) for i in range(2)]
            long_job = asyncio.create_task(_ttft(c, _ids(LONG_TOKENS, 1), 4))
            await asyncio.sleep(1.0)  # the long prefill is under way
            behind = []
            while not long_job.done() and len(behind) < 4:
                behind.append(await _ttft(c, _ids(40, 200 + len(behind)), 4))
            return alone, behind, await long_job

    alone, behind, (long_first, long_total) = asyncio.run(main())
    assert behind, f"the long prompt finished in {long_total:.1f}s before any short was sent"
    alone_ttft = max(t for t, _ in alone)
    worst = max(t for t, _ in behind)
    # a short stream waits about a chunk, never the whole long prefill
    assert worst < 0.5 * long_first, (alone_ttft, behind, long_first)
    group.wait_pool_free()
    assert group.status()["scheduler_stats"] is not None
