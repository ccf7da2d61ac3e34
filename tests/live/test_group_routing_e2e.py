"""Two ESP groups (controller replicas) behind the headroom request router
(app/routing.py). Group A holds one long request (most of its KV, 1 ongoing request);
group B holds two short streams (little KV, 2 ongoing). New short requests must go to
B, the group with KV headroom, where Serve's default router (fewest ongoing requests)
would pick A. Which group served what is read from the metrics endpoint, by group_id.
Tiny CPU shares so it fits next to the other test apps on 2 cores."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from tests.observe.conftest import wait_for_metrics
from tests.support.live_config import tiny_group_config

from .test_esp_serving import prompt_ids

pytestmark = pytest.mark.slow

KV = 2048
MODEL = "groups-test"  # its own model_name label: this app's series only
LONG = 1000
GROUPS_CONFIG = tiny_group_config(
    MODEL, KV, groups={"min_groups": 2, "max_groups": 2, "routing_stats_period_s": 0.5}
)


@pytest.fixture(scope="module")
def groups_app():
    from tests.serve_session import deploy, release

    base, _ = deploy("groups", "/groups", GROUPS_CONFIG)
    yield base
    release("groups")


def _metrics_url() -> str:
    import ray

    return f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"


def _open_stream(stack, c: httpx.Client, prompt, max_tokens: int):
    r = stack.enter_context(
        c.stream(
            "POST",
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            },
        )
    )
    assert r.status_code == 200
    lines = r.iter_lines()
    next(lines)  # its first token is out: the request holds its KV
    return lines


def test_short_requests_go_to_the_group_with_kv_headroom(groups_app):
    from esp_serve.app.metrics import METRIC_PREFIX_AS_SCRAPED as P

    n_short = 6
    with httpx.Client(base_url=groups_app, timeout=60) as c, contextlib.ExitStack() as stack:
        # decoding is fast (~100 tokens/s): lengths keep all three alive through the test
        long_lines = _open_stream(stack, c, prompt_ids(LONG, seed=5), KV - LONG - 8)
        time.sleep(1)  # the loads reach the router (reported every 0.5 s)
        held = [_open_stream(stack, c, f"hold {i}", 1000) for i in range(2)]
        time.sleep(1)
        for i in range(n_short):
            r = c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": f"hi {i}", "max_tokens": 2, "ignore_eos": True},
            )
            assert r.status_code == 200, r.text
        for lines in (long_lines, *held):
            next(lines)  # all still decoding; closing the streams aborts them

    def per_group(samples, name, **labels):
        out: dict[str, float] = {}
        for s in samples:
            if (
                s.name == P + name
                and s.labels.get("model_name") == MODEL
                and all(s.labels.get(k) == v for k, v in labels.items())
            ):
                out[s.labels["group_id"]] = out.get(s.labels["group_id"], 0) + s.value
        return out

    def seen(samples):
        return (
            sum(per_group(samples, "esp_request_success_total", finished_reason="length").values()) >= n_short
            and sum(per_group(samples, "esp_request_success_total", finished_reason="abort").values()) >= 3
        )

    try:
        samples = wait_for_metrics(_metrics_url(), seen, timeout_s=40)
    except AssertionError as err:
        from prometheus_client.parser import text_string_to_metric_families

        from tests.observe.conftest import scrape

        samples = [x for f in text_string_to_metric_families(scrape(_metrics_url())) for x in f.samples]
        raise AssertionError(
            {
                r: per_group(samples, "esp_request_success_total", finished_reason=r)
                for r in ("length", "abort", "stop", "error")
            }
            | {"prompt": per_group(samples, "esp_prompt_tokens_total")}
        ) from err
    prompt = per_group(samples, "esp_prompt_tokens_total")
    assert len(prompt) == 2, prompt
    (a,) = [g for g, n in prompt.items() if n >= LONG]  # the group with the long request
    (b,) = [g for g in prompt if g != a]
    aborts = per_group(samples, "esp_request_success_total", finished_reason="abort")
    shorts = per_group(samples, "esp_request_success_total", finished_reason="length")
    assert aborts == {a: 1, b: 2}, aborts  # the held streams went to B already
    assert shorts == {b: n_short}, shorts  # B: 2 ongoing but KV headroom; A: 1, KV full
