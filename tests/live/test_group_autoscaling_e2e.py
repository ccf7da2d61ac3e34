"""Serve adds an ESP group under KV pressure and removes it when the load is gone.

One group of one CPU instance (2048 KV slots), autoscaling between 1 and 2 groups on
esp_saturation (app/autoscaling.py) with no upscale delay and a short downscale delay.
Three requests of 600 prompt + 600 output tokens cannot fit one group two at a time, so its
saturation ((KV used + queued prompt tokens) / KV slots) stays far above the 0.5 target:
Serve must start a second controller replica (its own placement group and instance). When
every request has finished, saturation falls to 0 and Serve must go back to one group.
Every request still gets all its tokens. Read from Serve's own status, not from our
metrics. Tiny CPU shares so it fits beside the other test apps on 2 cores."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support.live_config import tiny_group_config

from .test_esp_serving import prompt_ids

pytestmark = pytest.mark.slow

APP = "autoscale"
MODEL = "autoscale-test"
KV = 2048
PROMPT, OUTPUT = 600, 600
CONFIG = tiny_group_config(
    MODEL,
    KV,
    request_timeout_s=300,
    groups={
        "min_groups": 1,
        "max_groups": 2,
        "target_saturation": 0.5,
        "upscale_delay_s": 0,
        "downscale_delay_s": 2,
        "look_back_period_s": 1,
        "metrics_interval_s": 0.5,
        "routing_stats_period_s": 0.5,
        "graceful_shutdown_timeout_s": 30,
    },
)


def _running_groups() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "ESPController" not in app.deployments:
        return 0
    return int(app.deployments["ESPController"].replica_states.get("RUNNING", 0))


def _wait_for_groups(n: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _running_groups() == n:
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError(f"{n} running ESP groups not reached in {timeout_s} s (now {_running_groups()})")


@pytest.fixture(scope="module")
def autoscale_app():
    from tests.serve_session import deploy, release

    base, _ = deploy(APP, f"/{APP}", CONFIG)
    yield base
    release(APP)


def test_serve_adds_a_group_under_kv_pressure_and_removes_it_after(autoscale_app):
    assert _running_groups() == 1
    results: dict[int, dict] = {}
    samples: list[tuple[float, int]] = []  # (time, running groups), every 0.25 s
    done = threading.Event()

    def run(i: int) -> None:
        body = {"model": MODEL, "prompt": prompt_ids(PROMPT, seed=100 + i), "max_tokens": OUTPUT}
        body["ignore_eos"] = True
        r = httpx.post(f"{autoscale_app}/v1/completions", json=body, timeout=300)
        results[i] = {"status": r.status_code, "body": r.json(), "t_end": time.monotonic()}

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), _running_groups()))
            time.sleep(0.25)

    t_start = time.monotonic()
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1, 2]
    for i, res in results.items():
        assert res["status"] == 200, (i, res)
        assert res["body"]["usage"]["completion_tokens"] == OUTPUT, (i, res["body"]["usage"])
    down_after_s = _wait_for_groups(1, timeout_s=60)
    done.set()
    sampler.join()

    assert max(n for _, n in samples) == 2, samples  # never more than max_groups
    t_up = min(t for t, n in samples if n == 2)
    # while two requests were still to finish, the group had >= 1200 tokens of KV demand
    # (saturation >= 0.59 > target): the second group must not have been removed then
    t_second_last_end = sorted(r["t_end"] for r in results.values())[1]
    assert all(n == 2 for t, n in samples if t_up <= t <= t_second_last_end), samples
    print(
        f"second group running {t_up - t_start:.1f} s after the load began; "
        f"back to one group {down_after_s:.1f} s after the last request ended"
    )
