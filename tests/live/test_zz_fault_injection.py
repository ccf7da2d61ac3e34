"""Fault injection (runs last in tests/live: it rebuilds the group): kill the instance
actor of the 2-instance group that holds the requests' KV in the middle of decode with
ray.kill. The requests whose
KV the group held are resumed transparently (re-prefilled over prompt + the tokens
already streamed on the rebuilt group) and complete with exactly the tokens of an
undisturbed run (greedy); the group (new actor in the same bundle, world group re-formed
on both instances) serves again within 60 s with a fully free pool."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from .conftest import MODEL, live_replica

pytestmark = pytest.mark.slow

MAX_TOKENS = 600


def stream_until_end(live, body: dict, first_token: threading.Event, out: dict) -> None:
    """Read a stream into `out` until it ends; a cut connection is recorded as out["cut"]."""
    try:
        _read_stream(live, body, first_token, out)
    except httpx.HTTPError as err:
        out["cut"] = repr(err)


def streams_cut_by_a_kill(live, prompts: list[str], deployment: str, max_tokens: int = 1200) -> list[dict]:
    """One long stream per prompt; once every one has a token and none has ended, kill
    `deployment`'s replica; returns each stream's record (stream_until_end) after all
    clients ended."""
    import ray

    outs: list[dict] = [{} for _ in prompts]
    started = [threading.Event() for _ in prompts]
    bodies = [
        {"model": MODEL, "prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        for p in prompts
    ]
    threads = [
        threading.Thread(target=stream_until_end, args=(live, b, s, o))
        for b, s, o in zip(bodies, started, outs)
    ]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(60), "no token streamed"
    assert not any(o.get("done") for o in outs), "a stream ended before the kill: make them longer"
    ray.kill(live_replica(deployment), no_restart=True)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), f"a client hung after its {deployment} replica died"
    return outs


def wait_until_serving(
    live, timeout_s: float, ok=lambda r: r.status_code == 200, interval_s: float = 1.0
) -> None:
    """Send a small completion until `ok(response)`; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with live.http() as c:
            try:
                if ok(c.post("/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 4})):
                    return
            except Exception:  # noqa: BLE001 - the ingress may time out or be down while it restarts
                pass
        assert time.monotonic() < deadline, f"the app did not serve again within {timeout_s:g} s"
        time.sleep(interval_s)


def _read_stream(live, body: dict, first_token: threading.Event, out: dict) -> None:
    with httpx.Client(
        base_url=live.base_url, timeout=180, headers={"Authorization": f"Bearer {live.api_key}"}
    ) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                    continue
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                for ch in chunk.get("choices") or ():
                    out["text"] = out.get("text", "") + ch.get("text", "")
                    out["chunks"] = out.get("chunks", 0) + 1
                    if ch.get("finish_reason"):
                        out["finish_reason"] = ch["finish_reason"]
                first_token.set()


def test_killing_an_instance_mid_decode_resumes_its_requests_and_the_group_rebuilds(live):
    import ray

    group = live.status()["group_id"]
    recoveries = live.status()["recoveries"]
    started = threading.Event()
    prompts = ["a long story about", "the history of the sea"]
    outs = [{}, {}]
    bodies = [
        {
            "model": MODEL,
            "prompt": p,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for p in prompts
    ]
    threads = [
        threading.Thread(target=stream_until_end, args=(live, b, started, o)) for b, o in zip(bodies, outs)
    ]
    for t in threads:
        t.start()
    assert started.wait(60), "no token streamed"
    time.sleep(0.5)  # well inside decode
    # the instance holding the requests' KV (decode packing puts both short prompts on
    # one instance; with decode look-ahead it has two sub-plans in flight when it dies)
    st = live.status()
    free, cached = st["scheduler_free_slots"], {x["instance"]: x["cached_tokens"] for x in st["instances"]}
    holder = min(range(len(free)), key=lambda i: free[i] + cached.get(i, 0))  # (cache entries aside)
    named = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"] == f"esp-instance-{group}-{holder}"
    ]
    assert named, ray.util.list_named_actors(all_namespaces=True)
    victim = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
    ray.kill(victim, no_restart=True)
    at_kill = [o.get("chunks", 0) for o in outs]
    for t in threads:
        t.join(180)
        assert not t.is_alive(), "a stream hung after the kill"
    assert min(at_kill) < MAX_TOKENS, ("the kill came after decode", at_kill)
    for o in outs:  # every in-flight request completes in full, no error, no truncation
        assert o["status"] == 200 and "error" not in o and o.get("done"), o
        assert o["usage"]["completion_tokens"] == MAX_TOKENS, o
        assert o["finish_reason"] == "length", o
    st = live.status()
    assert st["recoveries"] == recoveries + 1, st
    # the group rebuilt itself and serves; greedy resumed streams equal undisturbed runs
    # (no token missing or repeated at the seam)
    with live.http() as c:
        for p, o in zip(prompts, outs):
            r = c.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": p,
                    "max_tokens": MAX_TOKENS,
                    "ignore_eos": True,
                    "temperature": 0,
                },
                timeout=180,
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            assert o["text"] == r.json()["choices"][0]["text"]
        # a long prompt still runs across both instances of the rebuilt group
        r = c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x" * 2500, "max_tokens": 2, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
    st = live.wait_pool_free()
    assert st["recoveries"] == recoveries + 1 and st["instances_answering"] == 2
