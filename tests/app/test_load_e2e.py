"""Concurrency, cancellation and back-pressure end to end: after each, every instance's KV
pool must be fully free again (read from the instances through /v1/esp/status)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .conftest import API_KEY, KV_SLOTS, MAX_WAITING

pytestmark = pytest.mark.slow

MODEL = "builtin"


def test_32_concurrent_requests_all_complete_and_free_the_pool(server):
    async def main():
        client = server.async_openai()
        prompts = [f"request number {i}: " + "abc" * (i % 7) for i in range(32)]

        async def one(i, prompt):
            if i % 2:
                stream = await client.completions.create(
                    model=MODEL,
                    prompt=prompt,
                    max_tokens=8 + i % 5,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                return "".join([c.choices[0].text async for c in stream]), 8 + i % 5
            out = await client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=8 + i % 5,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert out.usage.completion_tokens == 8 + i % 5
            return out.choices[0].text, 8 + i % 5

        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        await client.close()
        return prompts, results

    prompts, results = asyncio.run(main())
    assert len(results) == 32
    # concurrency changes nothing: each greedy result equals the same request run alone
    client = server.openai()
    for i in (0, 5, 31):
        alone = client.completions.create(
            model=MODEL,
            prompt=prompts[i],
            max_tokens=results[i][1],
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert alone.choices[0].text == results[i][0]
    server.wait_pool_free()


def test_closing_a_stream_cancels_the_request_and_frees_its_kv(server):
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 900, "stream": True, "ignore_eos": True}
    for _ in range(2):
        with server.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
            # the KV of the running request is held while it streams
            assert min(i["free_slots"] for i in server.status()["instances"]) < KV_SLOTS
        # leaving the block closes the connection mid-stream
    st = server.wait_pool_free()  # earlier requests' prefix-cache entries may hold slots
    assert all(
        i["free_slots"] + i.get("cached_tokens", 0) == i["total_slots"] == KV_SLOTS for i in st["instances"]
    )


def test_queue_full_answers_503_with_retry_after(server):
    """Fill both instances' KV with two long requests, so new ones wait; beyond
    max_waiting_requests waiting ones, the controller refuses with 503 + Retry-After."""

    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as c:
            blockers = []
            for _ in range(2):  # each may grow to 6 + 1018 = 1024 slots: the whole pool
                body = {
                    "model": MODEL,
                    "prompt": "block",
                    "max_tokens": 1018,
                    "stream": True,
                    "ignore_eos": True,
                }
                req = c.build_request("POST", "/v1/completions", json=body)
                blockers.append(await c.send(req, stream=True))
            assert all(b.status_code == 200 for b in blockers)
            # both instances are busy decoding: health and status still answer at once
            assert (await c.get("/health")).status_code == 200
            for _ in range(100):  # the blockers' prefills run soon after admission
                busy = (await c.get("/v1/esp/status")).json()
                if busy["running"] == 2 and not busy["fully_free"]:
                    break
                await asyncio.sleep(0.05)
            assert busy["running"] == 2 and not busy["fully_free"], busy
            # the ESP scheduler admits by peak demand (both blockers may grow to 1024
            # tokens: all 2048 slots), so nothing else fits until one finishes
            assert sum(busy["scheduler_free_slots"]) < 2 * KV_SLOTS

            async def waiting_request():
                # (with a short max_tokens the peak-demand check would admit it beside
                # the blockers: it would finish long before they peak)
                body = {"model": MODEL, "prompt": "small", "max_tokens": 1000, "stream": True}
                return await c.send(c.build_request("POST", "/v1/completions", json=body), stream=True)

            responses = []
            for _ in range(MAX_WAITING + 3):
                responses.append(await waiting_request())
            statuses = [r.status_code for r in responses]
            refused = [r for r in responses if r.status_code == 503]
            assert refused, statuses
            assert statuses[:MAX_WAITING].count(200) >= MAX_WAITING - 2
            for r in refused:
                await r.aread()
                assert r.headers["retry-after"].isdigit()
                err = r.json()["error"]
                assert err["code"] == "queue_full" and err["type"] == "server_error"
                assert set(err) == {"message", "type", "param", "code"}
            for r in responses + blockers:
                await r.aclose()

    asyncio.run(main())
    server.wait_pool_free(timeout=60)
