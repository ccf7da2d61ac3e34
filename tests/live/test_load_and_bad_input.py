"""Bounded loopback load (CI-sized) and the bad-input suite, over HTTP on the live app."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from .conftest import MODEL

pytestmark = pytest.mark.slow

NUM_REQUESTS = 200
CONCURRENCY = 32


def test_bounded_load_every_request_answered_none_lost_pool_free(live):
    """200 requests, half streaming, prompts up to 512 tokens plus 3 of 2500, at most 16
    output tokens, 32 at a time: each ends complete (all its tokens) or with a clear
    error; the KV pool is fully free at the end."""
    rng = random.Random(7)
    plans = []
    for i in range(NUM_REQUESTS):
        n = 2500 if i in (17, 101, 180) else rng.randint(1, 512)
        plans.append(([rng.randrange(32, 127) for _ in range(n)], rng.randint(1, 16), i % 2 == 1))
    outcomes: dict[int, tuple[str, int]] = {}

    async def main():
        sem = asyncio.Semaphore(CONCURRENCY)
        async with live.async_http() as c:

            async def one(i, ids, max_tokens, stream):
                body = {
                    "model": MODEL,
                    "prompt": ids,
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "stream": stream,
                    "temperature": 0.7,
                    "seed": i,
                }
                if stream:  # the closing usage chunk counts the tokens streamed
                    body["stream_options"] = {"include_usage": True}
                async with sem:
                    if not stream:
                        r = await c.post("/v1/completions", json=body)
                        if r.status_code != 200:
                            outcomes[i] = ("error", r.status_code)
                            assert r.json()["error"]["message"]
                            return
                        outcomes[i] = ("ok", r.json()["usage"]["completion_tokens"])
                        return
                    tokens, done = None, False
                    async with c.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            await r.aread()
                            outcomes[i] = ("error", r.status_code)
                            return
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                chunk = json.loads(line[6:])
                                if "error" in chunk:
                                    outcomes[i] = ("error", 500)
                                    assert chunk["error"]["message"]
                                    return
                                if chunk.get("usage"):
                                    tokens = chunk["usage"]["completion_tokens"]
                    assert done, f"stream {i} ended without [DONE]"
                    assert tokens is not None, f"stream {i} sent no usage chunk"
                    outcomes[i] = ("ok", tokens)

            await asyncio.gather(*(one(i, *p) for i, p in enumerate(plans)))

    asyncio.run(main())
    assert sorted(outcomes) == list(range(NUM_REQUESTS))  # none lost
    for i, (kind, value) in outcomes.items():
        if kind == "ok":
            assert value == plans[i][1], (i, value)  # complete: every requested token, streamed or not
    errors = {i: v for i, (k, v) in outcomes.items() if k == "error"}
    assert not errors, errors  # nothing here should fail (no overload, nothing too long)
    live.wait_pool_free(timeout=60)


BAD_BODIES = [
    ("malformed JSON", b'{"model": "builtin", "prompt": "x", ', 400),
    ("JSON not an object", b"[1, 2, 3]", 400),
    ("prompt wrong type", {"model": MODEL, "prompt": {"a": 1}}, 400),
    ("max_tokens wrong type", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400),
    ("temperature out of range", {"model": MODEL, "prompt": "x", "temperature": -1}, 400),
    ("top_p out of range", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400),
    ("negative max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400),
    ("huge max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": 10**12}, 400),
    ("n too large", {"model": MODEL, "prompt": "x", "n": 10**6}, 400),
    ("token id out of vocab", {"model": MODEL, "prompt": [1, 2, 10**9]}, 400),
    ("empty token list", {"model": MODEL, "prompt": []}, 400),
    ("unknown model", {"model": "gpt-17", "prompt": "x"}, 404),
    ("missing model", {"prompt": "x"}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_clear_4xx_in_the_openai_envelope(live, name, body, status):
    with live.http() as c:
        if isinstance(body, bytes):
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v1/completions", json=body)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_odd_text_oversized_body_then_server_unharmed(live):
    with live.http() as c:
        # an empty prompt, as text or inside a batch of prompts, is a 400 in the envelope
        for prompt in ("", ["ok", ""], [[1, 2], []]):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 400, (prompt, r.text)
            assert "empty" in r.json()["error"]["message"]
        # invalid UTF-8 in the body: a 400, not a crash
        r = c.post(
            "/v1/completions",
            content=b'{"model": "builtin", "prompt": "\xff\xfe"}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]
        # unusual but valid unicode is served (byte tokenizer: any text is a prompt)
        for text in ["\u202e\u0000\ufeff", "\U0001f600" * 20, "\ud7ff\ue000 ZW\u200bJ", "e\u0301" * 50]:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 3})
            assert r.status_code == 200, (text, r.text)
        # lone surrogates escaped in JSON cannot become UTF-8 text: refused up front
        r = c.post(
            "/v1/completions",
            content=b'{"model": "builtin", "prompt": "\\ud800", "echo": true}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert "surrogate" in r.json()["error"]["message"]
        # oversized body: 413 in the envelope, before parsing
        r = c.post(
            "/v1/completions",
            content=b'{"prompt": "' + b"a" * (64 << 20) + b'"}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert r.json()["error"]["message"]
        # the server is unharmed
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    live.wait_pool_free()


def test_client_abort_during_a_multi_instance_prefill_frees_kv_everywhere(live):
    """A prompt too long for one instance is prefilled across both; the client hangs up
    while that prefill holds KV on every instance: the ingress cancels the stream, the
    controller aborts the request, and every instance's pool is free again."""
    import ray

    from esp_serve.app.metrics import METRIC_PREFIX_AS_SCRAPED as P
    from tests.observe.conftest import wait_for_metrics

    from .conftest import KV_SLOTS, NUM_INSTANCES

    group = live.status()["group_id"]
    url = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"

    def aborts(samples) -> float:
        return sum(
            s.value
            for s in samples
            if s.name == P + "esp_request_success_total"
            and s.labels.get("group_id") == group
            and s.labels.get("finished_reason") == "abort"
        )

    aborted_before = aborts(wait_for_metrics(url, lambda samples: True))
    rng = random.Random(11)
    ids = [rng.randrange(32, 127) for _ in range(3000)]
    assert len(ids) > KV_SLOTS  # cannot fit one instance
    body = {"model": MODEL, "prompt": ids, "max_tokens": 600, "ignore_eos": True, "stream": True}
    seen_all_used = False
    with live.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not seen_all_used:
            st = live.status()
            used = [i["total_slots"] - i["free_slots"] for i in st["instances"]]
            in_prefill = st["waiting"] >= 1  # admitted, its first token not yet out
            seen_all_used = in_prefill and len(used) == NUM_INSTANCES and all(u > 0 for u in used)
            time.sleep(0.02)
    # leaving the block closed the connection mid-request
    assert seen_all_used, "the prompt's prefill was never seen holding KV on every instance"
    st = live.wait_pool_free(timeout=60)
    assert st["fully_free"]
    # it ended as an abort (not by running its 600 tokens to the end)
    wait_for_metrics(url, lambda samples: aborts(samples) > aborted_before, timeout_s=30)
    with live.http() as c:  # and the group serves the next request
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
