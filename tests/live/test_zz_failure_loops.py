"""Failure loops, live (runs last in tests/live: it rebuilds groups): a "poison" request
that crashes every batch it is in (recovery.fault_injection_token, a real exception in the
instance's forward) fails alone after request_retries + 1 failures while the requests
batched with it complete with exactly their undisturbed tokens; a request that hangs its
instance is ended by the watchdog and the group serves again; a group that must rebuild
more often than recovery.max_recoveries_per_minute stops and reports unhealthy.

Its own apps (fault injection on), deleted at the end."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.serve_session import ServeClient
from tests.support.live_config import tiny_group_config

pytestmark = pytest.mark.slow

POISON = 7  # byte ids of the built-in tokenizer that no test text contains
HANG = 8
KV = 2048
MODEL = "failloops"
WATCHDOG_FLOOR_S = 4.0
RETRIES = 1


def app_config(served_name: str, **recovery) -> dict:
    # tiny CPU shares: the session's other apps hold most of Ray's CPUs
    config = tiny_group_config(served_name, KV, num_instances=2, request_timeout_s=180)
    config["model"]["max_model_len"] = 4096
    config["cluster"].update(group_init_timeout_s=15, comm_timeout_s=60)
    config["recovery"] = {"fault_injection_token": POISON, "hang_injection_token": HANG, **recovery}
    return config


@pytest.fixture(scope="module")
def group():
    from tests.serve_session import deploy, release

    config = app_config(
        MODEL, request_retries=RETRIES, max_recoveries_per_minute=30, watchdog_floor_s=WATCHDOG_FLOOR_S
    )
    base, timings = deploy("failloops", "/failloops", config)
    yield ServeClient(base, "unused", timings, kv_slots=KV, num_instances=2, timeout_s=180.0)
    release("failloops")


def body(prompt, max_tokens: int = 24, stream: bool = False, model: str = MODEL) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def stream(base: str, request: dict, out: dict) -> None:
    """One streaming completion; records its text, error event and [DONE]."""
    try:
        with httpx.Client(base_url=base, timeout=180) as c:
            with c.stream("POST", "/v1/completions", json=request) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        out["done"] = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out["error"] = chunk["error"]
                        for ch in chunk.get("choices") or ():
                            out["text"] = out.get("text", "") + ch.get("text", "")
                            out["finish_reason"] = ch.get("finish_reason") or out.get("finish_reason")
    except httpx.HTTPError as err:  # recorded: the test fails on it
        out["transport_error"] = repr(err)


def run_streams(base: str, requests: list[dict]) -> list[dict]:
    outs: list[dict] = [{} for _ in requests]
    threads = [threading.Thread(target=stream, args=(base, r, o)) for r, o in zip(requests, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
        assert not t.is_alive(), "a stream hung"
    return outs


def complete(client: ServeClient, prompt, max_tokens: int = 24) -> httpx.Response:
    with client.http() as c:
        return c.post("/v1/completions", json=body(prompt, max_tokens))


def wait_served(client: ServeClient, timeout: float = 90.0) -> dict:
    """The group's status once no rebuild runs and every KV pool is free again."""
    deadline = time.monotonic() + timeout
    while client.status()["recovering"]:
        assert time.monotonic() < deadline, "the group is still rebuilding"
        time.sleep(0.2)
    return client.wait_pool_free(max(1.0, deadline - time.monotonic()))


NORMAL = ["the quick brown fox", "once upon a time there", "a list of numbers:"]
POISON_PROMPT = [POISON, *b"a poisoned prompt"]


def test_a_poison_request_fails_alone_and_the_others_complete_exactly(group):
    reference = []
    for p in NORMAL:
        r = complete(group, p)
        assert r.status_code == 200, r.text
        reference.append(r.json()["choices"][0]["text"])
    before = group.status()["recoveries"]
    t0 = time.monotonic()
    outs = run_streams(
        group.base_url, [body(POISON_PROMPT, stream=True)] + [body(p, stream=True) for p in NORMAL]
    )
    poisoned, normal = outs[0], outs[1:]
    assert poisoned["status"] == 200 and poisoned.get("done"), poisoned
    error = poisoned["error"]
    assert error["code"] == "generation_failed", error
    assert "RuntimeError" in error["message"] and "request id" in error["message"], error
    assert "Traceback" not in error["message"] and "injected" not in error["message"], error
    for o, want in zip(normal, reference):  # every other request: no error, the same tokens
        assert o["status"] == 200 and "error" not in o and o.get("done"), o
        assert o["text"] == want and o["finish_reason"] == "length", (o, want)
    st = wait_served(group)
    assert st["recoveries"] - before == RETRIES + 1, st  # the poison one fails, nobody else
    assert st["failures"]["requests_failed_after_retries"] >= 1 and not st["stopped"], st
    print(
        f"poison + 3 normal: {time.monotonic() - t0:.1f}s, {st['recoveries'] - before} recoveries, "
        f"failure accounting {st['failures']}"
    )
    # non-streaming: a 500 envelope naming the cause class and the request id
    r = complete(group, POISON_PROMPT)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_failed" and "RuntimeError" in err["message"], err
    assert "request id" in err["message"], err
    wait_served(group)
    r = complete(group, NORMAL[0])  # the group serves on
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[0], r.text


def test_a_hanging_request_is_ended_by_the_watchdog_and_the_group_recovers(group):
    before = group.status()["recoveries"]
    t0 = time.monotonic()
    r = complete(group, [HANG, *b"a hanging prompt"])
    elapsed = time.monotonic() - t0
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_failed" and "WatchdogTimeout" in err["message"], err
    # (retries + 1) x (watchdog + rebuild): bounded, far from the hour the instance sleeps
    assert elapsed < (RETRIES + 1) * (WATCHDOG_FLOOR_S + 40), elapsed
    st = wait_served(group)
    assert st["recoveries"] - before == RETRIES + 1 and st["instances_answering"] == 2, st
    print(f"hang: failed after {elapsed:.1f}s")
    r = complete(group, NORMAL[1], max_tokens=4)
    assert r.status_code == 200, r.text


def test_a_group_past_its_recovery_rate_stops_and_reports_unhealthy():
    from tests.serve_session import deploy, release

    name = "failloops-rate"
    config = app_config(name, request_retries=2, max_recoveries_per_minute=1)
    config["cluster"]["num_instances"] = 1
    config["scheduler"]["policy"] = "local"
    base, timings = deploy(name, "/failloops-rate", config)
    try:
        outs = run_streams(base, [body(POISON_PROMPT, stream=True, model=name) for _ in range(2)])
        for o in outs:  # an error event (not a cut connection), or refused once the group stopped
            assert (o["status"] == 200 and o.get("error") and o.get("done")) or o["status"] == 503, outs
        assert any("max_recoveries_per_minute" in o.get("error", {}).get("message", "") for o in outs), outs
        # the second rebuild within a minute stopped the group: unhealthy until Serve replaces it
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
    finally:
        release(name)
