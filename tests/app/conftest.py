"""One Ray cluster and one real Serve app (real HTTP on loopback) for the whole session.

The app runs the test config below: the built-in model, 2 instances with a small KV pool
(so tests can fill it), API keys from an environment variable (set before ray.init so the
replicas inherit it; every client passes a key)."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def server():
    from tests.serve_session import deploy, release

    base, timings = deploy("esp", "/", TEST_CONFIG, env={KEYS_ENV: f"{API_KEY},{OTHER_KEY}"})
    yield Server(base, API_KEY, timings)
    release("esp")
