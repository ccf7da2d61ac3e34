"""One Ray cluster and one real Serve app (real HTTP on loopback) for the whole session.

The app runs the test config below: the built-in model, 2 instances with a small KV pool
(so tests can fill it), API keys from an environment variable (set before ray.init so the
replicas inherit it; every client passes a key)."""

from __future__ import annotations

import pytest

from tests.serve_session import ServeClient

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


@pytest.fixture(scope="session")
def server():
    from tests.serve_session import deploy, release

    base, timings = deploy("esp", "/", TEST_CONFIG, env={KEYS_ENV: f"{API_KEY},{OTHER_KEY}"})
    yield ServeClient(base, API_KEY, timings, kv_slots=KV_SLOTS, num_instances=2)
    release("esp")
