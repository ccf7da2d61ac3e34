"""Serve adds an ESP group under load and removes it when the load is gone.

One app with groups.min_groups 1, max_groups 2 (the controller deployment autoscaled by
app/autoscaling.py on KV saturation). Three clients keep long streams going (1,000-token
prompts, ~1,000 output tokens each): more KV than one group of 2,048 slots holds, so the
queued prompts push saturation past the target and Serve starts a second controller
replica (a second ESP group with its own placement group and instance). Once the clients
stop (their streams are closed: aborted), saturation falls to 0 and Serve removes it.
Tiny CPU shares so it fits next to the other test apps on 2 cores."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .test_esp_serving import prompt_ids

pytestmark = pytest.mark.slow

APP = "autoscale"
KV = 2048
MODEL = "autoscale-test"
PROMPT = 1000
CONFIG = {
    "model": {"path": "builtin", "served_name": MODEL, "max_model_len": KV},
    "cluster": {
        "num_instances": 1,
        "instance_resources": {"CPU": 0.01},
        "controller_resources": {"CPU": 0.01},
        "kv_slots_per_instance": KV,
        "num_threads_per_instance": 1,
    },
    "scheduler": {"policy": "esp", "calibration_interval_s": None},
    "server": {
        "api_keys_env": None,
        "ingress_max_replicas": 1,
        "ingress_num_cpus": 0.01,
        "request_timeout_s": 120,
    },
    "groups": {
        "min_groups": 1,
        "max_groups": 2,
        "target_saturation": 0.5,
        "upscale_delay_s": 0,
        "downscale_delay_s": 3,
        "look_back_period_s": 12,  # must exceed Serve's metrics interval (10 s)
        "routing_stats_period_s": 0.5,
    },
}


@pytest.fixture(scope="module")
def autoscale_app():
    from tests.serve_session import deploy, release

    base, _ = deploy(APP, "/autoscale", CONFIG)
    yield base
    release(APP)


def running_groups() -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments["ESPController"].replica_states
    return int(states.get("RUNNING", 0))


def wait_for_groups(n: int, timeout_s: float) -> list[tuple[float, int]]:
    """Poll until exactly n controller replicas run; returns the (time, count) history."""
    t0, history = time.monotonic(), []
    while True:
        count = running_groups()
        if not history or history[-1][1] != count:
            history.append((round(time.monotonic() - t0, 1), count))
        if count == n:
            return history
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{n} groups not reached in {timeout_s} s: {history}")
        time.sleep(0.5)


def keep_streaming(base: str, seed: int, stop: threading.Event, errors: list) -> None:
    """Back-to-back long streams until `stop` (closing the current one aborts it)."""
    body = {"model": MODEL, "max_tokens": KV - PROMPT - 8, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base, timeout=120) as c:
        while not stop.is_set():
            try:
                with c.stream(
                    "POST", "/v1/completions", json=dict(body, prompt=prompt_ids(PROMPT, seed))
                ) as r:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        return
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError as e:  # only while the test tears down
                if not stop.is_set():
                    errors.append(repr(e))
                return
            seed += 100


def test_serve_adds_and_removes_a_group_under_load(autoscale_app):
    assert wait_for_groups(1, 30)
    stop, errors = threading.Event(), []
    clients = [
        threading.Thread(target=keep_streaming, args=(autoscale_app, s, stop, errors)) for s in range(3)
    ]
    for t in clients:
        t.start()
    try:
        up = wait_for_groups(2, 120)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    assert not errors, errors
    down = wait_for_groups(1, 120)
    print(f"groups under load: {up}; after the load: {down}")
