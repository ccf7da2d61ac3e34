"""ESP over real HTTP: a prompt too long for one instance is prefilled across both
(DoP 2) and its greedy tokens equal a single in-process InstanceWorker's; mixed
concurrent traffic; memory pressure; the KV pool is fully free after each test."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import pytest

from .conftest import KV_SLOTS, MODEL, NUM_INSTANCES

pytestmark = pytest.mark.slow


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32, 127) for _ in range(n)]  # printable bytes of the byte vocab


def completion(c: httpx.Client, ids: list[int], max_tokens: int, **extra) -> dict:
    body = {
        "model": MODEL,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        **extra,
    }
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(choice: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


@pytest.fixture(scope="module")
def worker():
    from esp_core.runtime.config import WorkerConfig
    from esp_core.runtime.worker import InstanceWorker

    return InstanceWorker(WorkerConfig(model="builtin", kv_slots=8192, num_threads=1))


def test_long_prompt_prefilled_across_instances_equals_one_instance(live, worker):
    from tests.support.runtime import generate

    ids = prompt_ids(3000, seed=1)  # > KV_SLOTS: cannot fit one instance
    assert len(ids) + 1 > KV_SLOTS
    before = live.status()["prefill_dop_counts"].get(str(NUM_INSTANCES), 0)
    health: list[int] = []
    done = threading.Event()

    def poll_health():  # the controller's loop never blocks on the prefill
        with httpx.Client(base_url=live.base_url, timeout=10) as c:
            while not done.is_set():
                health.append(c.get("/health").status_code)
                done.wait(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        with live.http() as c:
            out = completion(c, ids, 8)
    finally:
        done.set()
        poller.join(15)
    got = token_ids(out["choices"][0])
    expected = generate(worker, {"r": ids}, max_new_tokens=8)["r"]  # ids: used as given
    assert got == expected
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["usage"]["completion_tokens"] == 8
    st = live.status()
    assert st["prefill_dop_counts"].get(str(NUM_INSTANCES), 0) > before, st
    assert health and set(health) == {200}
    live.wait_pool_free()


def test_concurrent_mixed_requests_match_their_solo_runs(live):
    long_ids = prompt_ids(2500, seed=2)
    shorts = [prompt_ids(5 + 37 * i, seed=10 + i) for i in range(8)]

    async def main():
        async with live.async_http() as c:

            async def one(ids, n, stream):
                body = {
                    "model": MODEL,
                    "prompt": ids,
                    "max_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": stream,
                }
                if not stream:
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["text"]
                text = []
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            import json

                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            text.append(chunk["choices"][0]["text"])
                return "".join(text)

            jobs = [one(long_ids, 12, False)] + [one(ids, 6 + i, bool(i % 2)) for i, ids in enumerate(shorts)]
            return await asyncio.gather(*jobs)

    texts = asyncio.run(main())
    lookahead_before = live.status()["decode_lookahead_steps"]
    with live.http() as c:  # concurrency changes nothing in greedy outputs
        for i in (0, 3, 8):
            ids, n = (long_ids, 12) if i == 0 else (shorts[i - 1], 6 + i - 1)
            alone = c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True},
            ).json()["choices"][0]["text"]
            assert alone == texts[i]
    # alone, a request's decode steps run one ahead (scheduler.decode_lookahead, on by default)
    assert live.status()["decode_lookahead_steps"] > lookahead_before
    live.wait_pool_free()


def test_memory_pressure_queues_and_refuses_what_can_never_fit(live):
    # 4 x (1500 + 16) tokens need 6064 slots of 4096: some wait (or are preempted) and all
    # complete
    prompts = [prompt_ids(1500, seed=20 + i) for i in range(4)]

    async def main():
        async with live.async_http() as c:

            async def one(ids):
                r = await c.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": ids,
                        "max_tokens": 16,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                )
                return r.status_code, r.json()

            return await asyncio.gather(*(one(p) for p in prompts))

    for status, body in asyncio.run(main()):
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 16
    with live.http() as c:  # longer than the whole pool (yet under max_model_len)
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt_ids(5000, 3), "max_tokens": 4})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "4096" in err["message"]
        assert (
            c.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2}).status_code
            == 200
        )
    live.wait_pool_free()
