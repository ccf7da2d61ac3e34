"""Graceful shutdown (scale-down or redeploy of a group): deleting the app while two
streams are in flight. The short one finishes in full within graceful_shutdown_timeout_s;
the long one cannot, and must end with a clear error event in the stream, never a
silent cut. Its own small app, deleted by the test."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.support.live_config import tiny_group_config

pytestmark = pytest.mark.slow

# the long stream asks for KV - 100 tokens: ~30 s of decode at ~4 ms a token, far past
# GRACE_S (with 2,048 slots it could finish within the grace period on a fast moment)
KV = 8192
MODEL = "drain-test"
GRACE_S = 8.0
SHORT = 40  # tokens: well under GRACE_S of decode on the built-in model, even loaded
DRAIN_CONFIG = tiny_group_config(MODEL, KV, policy="local", groups={"graceful_shutdown_timeout_s": GRACE_S})


def _stream(base: str, max_tokens: int, first_token: threading.Event, out: dict) -> None:
    body = {
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        out["done"] = True
                        out["done_at"] = time.monotonic()
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out["error"] = chunk["error"]
                        if chunk.get("usage"):
                            out["completion_tokens"] = chunk["usage"]["completion_tokens"]
                        for ch in chunk.get("choices") or ():
                            out["chunks"] = out.get("chunks", 0) + 1
                            out["finish_reason"] = ch.get("finish_reason") or out.get("finish_reason")
                        first_token.set()
    except httpx.HTTPError as err:  # a cut connection: recorded, the test fails on it
        out["transport_error"] = repr(err)
    finally:
        first_token.set()


def test_deleting_a_group_drains_short_streams_and_ends_long_ones_with_an_error():
    from ray import serve

    from tests.serve_session import deploy, release

    base, _ = deploy("drain", "/drain", DRAIN_CONFIG)
    try:
        _delete_while_streaming(serve, base)
    finally:
        release("drain")  # the session's bookkeeping (and Ray's shutdown when last)


def _delete_while_streaming(serve, base: str) -> None:
    short, long_ = {}, {}
    started = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=_stream, args=(base, SHORT, started[0], short)),
        threading.Thread(target=_stream, args=(base, KV - 100, started[1], long_)),
    ]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started), (short, long_)
    t0 = time.monotonic()
    serve.delete("drain")  # what a redeploy does; a scale-down drains the group alike
    for t in threads:
        t.join(60 + 2 * GRACE_S)
        assert not t.is_alive(), "a stream hung across the shutdown"
    # the short stream was in flight at the delete and still finished in full
    assert short.get("status") == 200 and short.get("done"), short
    assert short["done_at"] > t0, "the short stream ended before the delete: make it longer"
    assert short.get("completion_tokens") == SHORT, short
    assert short.get("finish_reason") == "length", short
    # the long one was ended explicitly, with a message saying what to do
    assert long_.get("status") == 200 and "transport_error" not in long_, long_
    assert "completion_tokens" not in long_, long_
    message = long_.get("error", {}).get("message", "")
    # the group's own goodbye ("... was shut down ...") when its __del__ ran before Serve
    # killed it, else the ingress's ("... stopped ...")
    assert "retry it" in message and ("shut down" in message or "stopped" in message), long_
