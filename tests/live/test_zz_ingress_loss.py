"""The ingress replica killed mid-stream, behind HAProxy (runs near the end of tests/live):
its clients' connections are cut, the controller aborts that replica's requests (the
event channel's EOF) so their KV returns to the pool, Serve starts a new ingress replica on
a new port, and HAProxy sends requests to it."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from tests.support.listeners import listeners

from .test_zz_fault_injection import streams_cut_by_a_kill, wait_until_serving

pytestmark = pytest.mark.slow


def test_killing_the_ingress_replica_frees_its_requests_kv_and_haproxy_serves_the_new_one(live):
    outs = streams_cut_by_a_kill(live, ["tale 0", "tale 1"], "OpenAIIngress")
    for o in outs:
        assert o["status"] == 200 and not o.get("done") and o.get("chunks", 0) < 1200, o  # cut, not finished
    # Serve starts a new ingress replica; HAProxy learns its port
    wait_until_serving(
        live, 120, ok=lambda r: r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    )
    live.wait_pool_free(timeout=60)  # the dead replica's requests were aborted, their KV freed
    holders = listeners().get(urlparse(live.base_url).port, [])
    assert holders and all("haproxy" in cmd.split()[0] for cmd in holders), holders
