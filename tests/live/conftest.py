"""The live ESP app for tests/live: one ESP group of 2 CPU instances, deployed next to the
tests/app app on the session's one Ray cluster and Serve proxy (tests/serve_session.py),
at route prefix /live.

Sizes make ESP unavoidable and memory pressure reachable: each instance holds 2048 KV
slots (4096 in the group) while max_model_len is 8192, so a 3000-token prompt cannot fit
one instance (prefill DoP 2) and a 5000-token prompt exceeds the whole pool (400
context_length_exceeded, not max_model_len).

Traces are on (OTLP over HTTP to a collector thread of the test process,
tests/live/otlp_collector.py), so tests/live/test_observability.py can read the spans of
real requests; metrics go to Ray's Prometheus endpoint as always."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest

from tests.live.otlp_collector import OTLPCollector

KEYS_ENV = "ESP_LIVE_TEST_API_KEYS"
API_KEY = "sk-live-key"
KV_SLOTS = 2048
NUM_INSTANCES = 2
MAX_MODEL_LEN = 8192
MODEL = "builtin"

LIVE_CONFIG = {
    "model": {"path": "builtin", "max_model_len": MAX_MODEL_LEN},
    "cluster": {"num_instances": NUM_INSTANCES, "instance_resources": {"CPU": 0.3},
                "controller_resources": {"CPU": 0.05}, "kv_slots_per_instance": KV_SLOTS,
                "num_threads_per_instance": 1, "group_init_timeout_s": 30,
                "comm_timeout_s": 60},
    "scheduler": {"policy": "esp", "max_waiting_requests": 256,
                  "calibration_interval_s": 5, "calibration_min_records": 10},
    "server": {"api_keys_env": KEYS_ENV, "ingress_max_replicas": 1, "ingress_num_cpus": 0.05,
               "request_timeout_s": 120},
}


@dataclass
class LiveServer:
    base_url: str
    api_key: str
    startup_s: dict
    collector: "OTLPCollector | None" = None

    def http(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120, **kw)

    def async_http(self, **kw) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=120, **kw)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key,
                             max_retries=0, timeout=120)

    def status(self) -> dict:
        with self.http() as c:
            r = c.get("/v1/esp/status")
            r.raise_for_status()
            return r.json()

    def wait_pool_free(self, timeout: float = 60.0) -> dict:
        """Until every instance's KV pool and the scheduler's view are fully free."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["fully_free"] and len(st["instances"]) == NUM_INSTANCES \
                    and st["scheduler_free_slots"] == [KV_SLOTS] * NUM_INSTANCES \
                    and not st["unfinished"]:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pool not free after {timeout}s: {st}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def live():
    from tests.live.otlp_collector import OTLPCollector
    from tests.serve_session import deploy, release

    collector = OTLPCollector()
    config = {**LIVE_CONFIG, "telemetry": {"tracing": "otlp",
                                           "otlp_endpoint": collector.endpoint,
                                           "service_name": "esp-live-test"}}
    base, timings = deploy("live", "/live", config, env={KEYS_ENV: API_KEY})
    yield LiveServer(base, API_KEY, timings, collector)
    release("live")
    collector.close()
