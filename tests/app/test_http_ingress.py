"""The HTTP path the shipped config sets up: HAProxy on the server's port, forwarding to the
ingress replica's own HTTP server (Ray Serve's HAProxy ingress). Every other HTTP test in
tests/app and tests/live goes through the same path (tests/serve_session.py)."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import httpx
import pytest

from tests.support.listeners import listeners

pytestmark = pytest.mark.slow

DIRECT_INGRESS_PORTS = range(30000, 31000)  # Ray Serve's default direct-ingress HTTP range


def test_the_port_is_served_by_haproxy(server):
    holders = listeners().get(urlparse(server.base_url).port, [])
    assert holders and all("haproxy" in cmd.split()[0] for cmd in holders), holders


def test_the_ingress_replica_answers_on_its_own_port_behind_haproxy(server):
    """Some port of the direct-ingress range is held by the ingress replica (a Ray worker,
    not HAProxy) and answers the app's own routes, API key included."""
    replica_ports = [
        port
        for port, cmds in listeners(under=os.getpid()).items()  # our cluster's, not another server's
        if port in DIRECT_INGRESS_PORTS and any(cmd.startswith("ray::ServeReplica") for cmd in cmds)
    ]
    assert replica_ports, "no ingress replica listens in the direct-ingress range"
    with httpx.Client(base_url=f"http://127.0.0.1:{replica_ports[0]}", timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401  # the app's key check, not a proxy's
        models = c.get("/v1/models", headers={"Authorization": f"Bearer {server.api_key}"})
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "builtin"
