"""One Ray cluster and one real Serve app (real HTTP on loopback) for the whole session.

The app runs the test config below: the built-in model, 2 instances with a small KV pool
(so tests can fill it), API keys from an environment variable (set before ray.init so the
replicas inherit it; every client passes a key)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import httpx
import pytest

KEYS_ENV = "ESP_TEST_API_KEYS"
API_KEY = "sk-test-key"
OTHER_KEY = "sk-other-key"
KV_SLOTS = 1024
MAX_MODEL_LEN = 1024
MAX_WAITING = 40

TEST_CONFIG = {
    "model": {"path": "builtin", "max_model_len": MAX_MODEL_LEN},
    "cluster": {"num_instances": 2, "instance_resources": {"CPU": 0.5},
                "kv_slots_per_instance": KV_SLOTS, "num_threads_per_instance": 1},
    "scheduler": {"max_waiting_requests": MAX_WAITING, "max_num_batched_tokens": 2048},
    "server": {"api_keys_env": KEYS_ENV, "ingress_max_replicas": 1, "request_timeout_s": 120},
}


@dataclass
class Server:
    base_url: str
    api_key: str
    startup_s: dict

    def http(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kw)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key,
                             max_retries=0, timeout=60)

    def async_openai(self):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key,
                                  max_retries=0, timeout=60)

    def status(self) -> dict:
        with self.http() as c:
            r = c.get("/v1/esp/status")
            r.raise_for_status()
            return r.json()

    def wait_pool_free(self, timeout: float = 30.0) -> dict:
        """Poll until every instance reports its KV pool fully free (releases are applied
        by the next plan an instance runs, so it can take a step)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["fully_free"] and st["scheduler_free_slots"] == [KV_SLOTS] * 2 \
                    and not st["unfinished"]:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pool not free after {timeout}s: {st}")
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[KEYS_ENV] = f"{API_KEY},{OTHER_KEY}"
    import ray
    from ray import serve

    from app.builder import build_app

    t0 = time.monotonic()
    owns_ray = not ray.is_initialized()  # another fixture of the session may have started it
    if owns_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t1 = time.monotonic()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(TEST_CONFIG), name="esp", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # serve.run returns once deployments are healthy; wait for HTTP too
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the test app did not become healthy within 120 s")
        time.sleep(0.2)
    t2 = time.monotonic()
    yield Server(base, API_KEY, {"ray_init_s": t1 - t0, "serve_up_s": t2 - t1})
    serve.shutdown()
    if owns_ray:
        ray.shutdown()
