"""One Ray cluster and one Serve HTTP proxy per test session, shared by every test area
that deploys an app (tests/app, tests/live): each area's session fixture calls `deploy`
with its own app name and route prefix, and `release` at teardown; the last release
shuts Serve (and Ray, if this module started it) down."""

from __future__ import annotations

import os
import socket
import time

import httpx

METRICS_REPORT_INTERVAL_MS = 1000

_state: dict = {"port": None, "owns_ray": False, "apps": set()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(name: str, route_prefix: str, config: dict, env: dict[str, str] | None = None,
           health_timeout_s: float = 120.0) -> tuple[str, dict]:
    """Deploy `app.builder:build_app(config)` as app `name`; returns (base URL, timings).
    `env` is set before Ray starts so that replicas inherit it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.update(env or {})
    import ray
    from ray import serve

    from app.builder import build_app

    t0 = time.monotonic()
    if not ray.is_initialized():
        # metrics exported every second (Ray's default: 10 s), so tests read them quickly
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS})
        _state["owns_ray"] = True
    t1 = time.monotonic()
    if _state["port"] is None:
        _state["port"] = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _state["port"]})
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    _state["apps"].add(name)
    base = f"http://127.0.0.1:{_state['port']}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + health_timeout_s
    while True:  # serve.run returns once deployments are healthy; wait for HTTP too
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"app {name} did not become healthy in {health_timeout_s} s")
        time.sleep(0.2)
    return base, {"ray_init_s": t1 - t0, "serve_up_s": time.monotonic() - t1}


def release(name: str) -> None:
    import ray
    from ray import serve

    _state["apps"].discard(name)
    if _state["apps"]:
        serve.delete(name)
        return
    serve.shutdown()
    _state["port"] = None
    if _state["owns_ray"]:
        ray.shutdown()
        _state["owns_ray"] = False
