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

import os
from dataclasses import dataclass

import pytest

from tests.live.otlp_collector import OTLPCollector
from tests.serve_session import ServeClient

API_KEY = "sk-live-key"
KV_SLOTS = 2048
NUM_INSTANCES = 2
MAX_MODEL_LEN = 8192
MODEL = "builtin"

LIVE_CONFIG = {
    "model": {"path": "builtin", "max_model_len": MAX_MODEL_LEN},
    "cluster": {
        "num_instances": NUM_INSTANCES,
        "instance_resources": {"CPU": 0.3},
        "controller_resources": {"CPU": 0.05},
        "kv_slots_per_instance": KV_SLOTS,
        "num_threads_per_instance": 1,
        "group_init_timeout_s": 30,
        "comm_timeout_s": 60,
    },
    "scheduler": {
        "policy": "esp",
        "max_waiting_requests": 256,
        "calibration_interval_s": 5,
        "calibration_min_records": 10,
        "decode_lookahead": True,  # (the default) the live group runs its steps ahead
    },
    "server": {
        "api_keys_env": None,
        "ingress_max_replicas": 1,
        "ingress_num_cpus": 0.05,
        "request_timeout_s": 120,
    },
}


@dataclass
class LiveServer(ServeClient):
    collector: OTLPCollector | None = None


@pytest.fixture(scope="session")
def live():
    from tests.live.otlp_collector import OTLPCollector
    from tests.serve_session import api_keys_file, deploy, release

    collector = OTLPCollector()
    config = {
        **LIVE_CONFIG,
        "telemetry": {
            "tracing": "otlp",
            "otlp_endpoint": collector.endpoint,
            "service_name": "esp-live-test",
        },
    }
    keys = api_keys_file("live", [API_KEY])
    config["server"] = {**config["server"], "api_keys_file": keys}
    base, timings = deploy("live", "/live", config)
    yield LiveServer(
        base,
        API_KEY,
        timings,
        kv_slots=KV_SLOTS,
        num_instances=NUM_INSTANCES,
        timeout_s=120.0,
        collector=collector,
    )
    release("live")
    collector.close()
    os.unlink(keys)


def live_replica(deployment: str):
    """The one replica actor of `deployment` in the live app (other test modules may leave
    their apps deployed: only names under SERVE_REPLICA::live# count)."""
    import ray

    named = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::live#{deployment}#")
    ]
    assert len(named) == 1, named
    return ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
