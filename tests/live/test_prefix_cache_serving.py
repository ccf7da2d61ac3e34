"""The prefix cache over real HTTP: a second question on the same document reuses the
document's KV (spread over both instances), reports it in
`usage.prompt_tokens_details.cached_tokens` (plain and streamed), shows it in
/v1/esp/status, and answers exactly as a single cold InstanceWorker does."""

from __future__ import annotations

import json

import pytest

from esp_serve.app.config import PrefixCacheSection

from .conftest import MODEL
from .test_esp_serving import completion, prompt_ids, token_ids, worker

pytestmark = pytest.mark.slow
__all__ = ["worker"]  # the module-scoped single-instance reference, shared

BLOCK = PrefixCacheSection().block_tokens  # the default


def streamed_usage(c, ids: list[int], max_tokens: int) -> tuple[list[int], dict]:
    body = {
        "model": MODEL,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens: list[int] = []
    usage: dict = {}
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk["choices"]:
                tokens += [int(t.removeprefix("token_id:")) for t in ch["logprobs"]["tokens"]]
            usage = chunk.get("usage") or usage
    return tokens, usage


def test_second_question_reuses_the_document_and_answers_as_cold(live, worker):
    from tests.support.runtime import generate

    doc = prompt_ids(3000, seed=31)  # more than one instance's pool: KV on both
    q1, q2, q3 = (doc + prompt_ids(n, seed=40 + n) for n in (20, 25, 15))
    hits_before = live.status()["prefix_cache"]["hit_tokens"]
    with live.http() as c:
        first = completion(c, q1, 8)
        second = completion(c, q2, 8)
        third, third_usage = streamed_usage(c, q3, 8)
    whole_blocks = len(doc) // BLOCK * BLOCK
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == whole_blocks
    assert third_usage["prompt_tokens_details"]["cached_tokens"] == whole_blocks
    assert third_usage["prompt_tokens"] == len(q3) and third_usage["completion_tokens"] == 8
    assert token_ids(second["choices"][0]) == generate(worker, {"r": q2}, max_new_tokens=8)["r"]
    assert third == generate(worker, {"r": q3}, max_new_tokens=8)["r"]
    st = live.status()
    assert st["prefix_cache"]["hit_tokens"] - hits_before == 2 * whole_blocks
    # the last answer's KV is the entry now: prompt and answer but its last token
    cached = [i["cached_tokens"] for i in st["instances"]]
    assert sum(cached) >= len(q3) + 7 and all(n > 0 for n in cached), st
    live.wait_pool_free()
