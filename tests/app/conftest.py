"""One Ray cluster and one real Serve app (real HTTP on loopback) for the whole session.

The app runs the test config below: the built-in model, 2 instances with a small KV pool
(so tests can fill it), API keys from a per-app key file (every client passes a key)."""

from __future__ import annotations

import os

import pytest

from tests.serve_session import ServeClient

API_KEY = "sk-test-key"
OTHER_KEY = "sk-other-key"
KV_SLOTS = 1024
MAX_MODEL_LEN = 1024
MAX_WAITING = 40

TEST_CONFIG = {
    "model": {"path": "builtin", "max_model_len": MAX_MODEL_LEN},
    "cluster": {
        "num_instances": 2,
        "instance_resources": {"CPU": 0.5},
        "kv_slots_per_instance": KV_SLOTS,
        "num_threads_per_instance": 1,
    },
    "scheduler": {"max_waiting_requests": MAX_WAITING, "max_num_batched_tokens": 2048},
    "server": {"api_keys_env": None, "ingress_max_replicas": 1, "request_timeout_s": 120},
}


@pytest.fixture(scope="session")
def server():
    from tests.serve_session import api_keys_file, deploy, release

    keys = api_keys_file("esp", [API_KEY, OTHER_KEY])
    config = {**TEST_CONFIG, "server": {**TEST_CONFIG["server"], "api_keys_file": keys}}
    base, timings = deploy("esp", "/", config)
    yield ServeClient(base, API_KEY, timings, kv_slots=KV_SLOTS, num_instances=2)
    release("esp")
    os.unlink(keys)
