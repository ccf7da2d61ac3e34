"""The ingress replica killed mid-stream, behind HAProxy (runs near the end of tests/live):
its clients' connections are cut, the controller aborts that replica's requests (the
event channel's EOF) so their KV returns to the pool, Serve starts a new ingress replica on
a new port, and HAProxy sends requests to it."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.support.listeners import listeners

from .conftest import MODEL, live_replica
from .test_zz_fault_injection import stream_until_end

pytestmark = pytest.mark.slow


def test_killing_the_ingress_replica_frees_its_requests_kv_and_haproxy_serves_the_new_one(live):
    import ray

    outs: list[dict] = [{}, {}]
    started = [threading.Event() for _ in outs]
    bodies = [
        {"model": MODEL, "prompt": f"tale {k}", "max_tokens": 1200, "ignore_eos": True, "stream": True}
        for k in range(len(outs))
    ]
    threads = [
        threading.Thread(target=stream_until_end, args=(live, b, s, o))
        for b, s, o in zip(bodies, started, outs)
    ]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(60), "no token streamed"
    ray.kill(live_replica("OpenAIIngress"), no_restart=True)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a client hung after its ingress replica died"
    for o in outs:
        assert o["status"] == 200 and not o.get("done") and o.get("chunks", 0) < 1200, o  # cut, not finished

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
