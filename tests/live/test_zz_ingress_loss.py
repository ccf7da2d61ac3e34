"""The ingress replica killed mid-stream, behind HAProxy (runs near the end of tests/live):
its clients' connections are cut, the controller aborts that replica's requests (the
event channel's EOF) so their KV returns to the pool, Serve starts a new ingress replica on
a new port, and HAProxy sends requests to it."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.support.listeners import listeners

from .conftest import MODEL

pytestmark = pytest.mark.slow


def _ingress_replica():
    import ray

    named = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::live#OpenAIIngress#")
    ]
    assert len(named) == 1, named
    return ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])


def _stream(live, body: dict, first_token: threading.Event, out: dict) -> None:
    """Read a stream until it ends or its connection is cut (recorded, not raised)."""
    try:
        with httpx.Client(
            base_url=live.base_url, timeout=180, headers={"Authorization": f"Bearer {live.api_key}"}
        ) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        out["done"] = True
                    elif line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                        out["tokens"] = out.get("tokens", 0) + 1
                        first_token.set()
    except httpx.HTTPError as err:
        out["cut"] = repr(err)


def test_killing_the_ingress_replica_frees_its_requests_kv_and_haproxy_serves_the_new_one(live):
    import ray

    outs: list[dict] = [{}, {}]
    started = [threading.Event() for _ in outs]
    bodies = [
        {"model": MODEL, "prompt": f"tale {k}", "max_tokens": 1200, "ignore_eos": True, "stream": True}
        for k in range(len(outs))
    ]
    threads = [
        threading.Thread(target=_stream, args=(live, b, s, o)) for b, s, o in zip(bodies, started, outs)
    ]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(60), "no token streamed"
    old = _ingress_replica()
    ray.kill(old, no_restart=True)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a client hung after its ingress replica died"
    for o in outs:
        assert o["status"] == 200 and not o.get("done") and o["tokens"] < 1200, o  # cut, not finished

    deadline = time.monotonic() + 120  # Serve starts a new ingress replica; HAProxy learns its port
    while True:
        with live.http() as c:
            try:
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 4})
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4:
                    break
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, "HAProxy did not reach a new ingress replica"
        time.sleep(1)
    live.wait_pool_free(timeout=60)  # the dead replica's requests were aborted, their KV freed
    holders = listeners().get(urlparse(live.base_url).port, [])
    assert holders and all("haproxy" in cmd.split()[0] for cmd in holders), holders
