"""One Ray cluster and one Serve HTTP proxy per test session, shared by every test area
that deploys an app (tests/app, tests/live): each area's session fixture calls `deploy`
with its own app name and route prefix, and `release` at teardown; the last release
shuts Serve (and Ray, if this module started it) down."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import httpx

METRICS_REPORT_INTERVAL_MS = 1000
DELETE_TIMEOUT_S = 180.0

_state: dict = {"port": None, "owns_ray": False, "apps": set()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_keys_file(name: str, keys: list[str]) -> str:
    """A file with one API key per line for app `name` (server.api_keys_file). A file,
    not an environment variable: Ray workers inherit the driver's environment only as it
    was at ray.init, so an env var would tie every app to whichever area deployed first."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"esp-{name}-keys-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(keys) + "\n")
    return path


def shipped_controller_options() -> dict | None:
    """serve_config.yaml's `controller_options` (the Serve controller's environment: which
    HTTP ingress serves the port), so the tests' server takes the path a user's does;
    HAProxy's side ports free ones, so a server already running on the machine is no bother."""
    from pathlib import Path

    import yaml

    from esp_serve.app.config import with_free_haproxy_side_ports

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    return with_free_haproxy_side_ports(doc.get("controller_options"))


def deploy(name: str, route_prefix: str, config: dict, health_timeout_s: float = 120.0) -> tuple[str, dict]:
    """Deploy `app.builder:build_app(config)` as app `name`; returns (base URL, timings)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from esp_serve.app.builder import build_app

    t0 = time.monotonic()
    if not ray.is_initialized():
        # metrics exported every second (Ray's default: 10 s), so tests read them quickly
        ray.init(
            # a cluster of the test's own, never one a `ray start` or `serve run` left running
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
        )
        _state["owns_ray"] = True
    t1 = time.monotonic()
    if _state["port"] is None:
        _state["port"] = _free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": _state["port"]},
            controller_options=shipped_controller_options(),
        )
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
        # Serve's blocking delete gives up after 60 s; an app of several groups stopping
        # on a loaded 2-core machine (instances, controllers, the ingress's drain) can
        # take longer, so wait on the status with a bound of our own
        serve.delete(name, _blocking=False)
        deadline = time.monotonic() + DELETE_TIMEOUT_S
        while name in serve.status().applications:
            if time.monotonic() > deadline:
                raise TimeoutError(f"app {name} not deleted after {DELETE_TIMEOUT_S} s")
            time.sleep(0.5)
        return
    serve.shutdown()
    _state["port"] = None
    if _state["owns_ray"]:
        ray.shutdown()
        _state["owns_ray"] = False


@dataclass
class ServeClient:
    """HTTP clients for one deployed app, and the pool-is-free check every area needs."""

    base_url: str
    api_key: str
    startup_s: dict
    kv_slots: int
    num_instances: int
    timeout_s: float = 60.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=self.timeout_s, **kw)

    def async_http(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), timeout=self.timeout_s, **kw
        )

    def openai(self):
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=self.timeout_s
        )

    def async_openai(self):
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=self.timeout_s
        )

    def status(self) -> dict:
        with self.http() as c:
            r = c.get("/v1/esp/status")
            r.raise_for_status()
            return r.json()

    def wait_pool_free(self, timeout: float = 60.0) -> dict:
        """Poll until every instance's KV pool and the scheduler's view are fully free
        (releases are applied by the next plan an instance runs, so it can take a step).
        KV of prefix-cache entries counts as free: the cache evicts it when needed."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            cached = [i.get("cached_tokens", 0) for i in st["instances"]]
            if (
                st["fully_free"]
                and len(st["instances"]) == self.num_instances
                and [f + c for f, c in zip(st["scheduler_free_slots"], cached)]
                == [self.kv_slots] * self.num_instances
                and not st["unfinished"]
            ):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pool not free after {timeout}s: {st}")
            time.sleep(0.1)
