"""Two ESP groups (controller replicas) behind the headroom request router
(app/routing.py). Group A holds one long request (most of its KV, 1 ongoing request);
group B holds two short streams (little KV, 2 ongoing). New short requests must go to
B, the group with KV headroom, where Serve's default router (fewest ongoing requests)
would pick A. Then prefix affinity (app/affinity.py): a document asked again goes to the
group that served it (its prefix cache holds it) even when that group is the busier one,
while a new document still goes by headroom. Which group served what is read from the
metrics endpoint, by group_id. Tiny CPU shares so it fits next to the other test apps on
2 cores."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from tests.observe.conftest import wait_for_metrics
from tests.support.live_config import tiny_group_config

from .test_esp_serving import prompt_ids

pytestmark = pytest.mark.slow

KV = 8192  # roomy enough that the streams below outlive each test however fast decode is
MODEL = "groups-test"  # its own model_name label: this app's series only
LONG = 1000
GROUPS_CONFIG = tiny_group_config(
    MODEL,
    KV,
    groups={
        "min_groups": 2,
        "max_groups": 2,
        "routing_stats_period_s": 0.5,
        # the busier group keeps the document's follow-ups however fast the stream that
        # makes it busy decodes (the default 0.5 would depend on it)
        "affinity_max_imbalance": 0.9,
    },
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


def per_group(samples, name, **labels) -> dict[str, float]:
    """The metric's value per group_id, over this app's series with these labels."""
    from esp_serve.app.metrics import METRIC_PREFIX_AS_SCRAPED as P

    out: dict[str, float] = {}
    for s in samples:
        if (
            s.name == P + name
            and s.labels.get("model_name") == MODEL
            and all(s.labels.get(k) == v for k, v in labels.items())
        ):
            out[s.labels["group_id"]] = out.get(s.labels["group_id"], 0) + s.value
    return out


def test_short_requests_go_to_the_group_with_kv_headroom(groups_app):
    n_short = 6
    with httpx.Client(base_url=groups_app, timeout=60) as c, contextlib.ExitStack() as stack:
        # decoding is fast (~150 tokens/s): lengths keep all three alive through the test
        long_lines = _open_stream(stack, c, prompt_ids(LONG, seed=5), KV - LONG - 8)
        time.sleep(1)  # the loads reach the router (reported every 0.5 s)
        held = [_open_stream(stack, c, f"hold {i}", 3000) for i in range(2)]
        time.sleep(1)
        for i in range(n_short):
            r = c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": f"hi {i}", "max_tokens": 2, "ignore_eos": True},
            )
            assert r.status_code == 200, r.text
        for lines in (long_lines, *held):
            next(lines)  # all still decoding; closing the streams aborts them

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


def _scrape_samples() -> list:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.observe.conftest import scrape

    return [x for f in text_string_to_metric_families(scrape(_metrics_url())) for x in f.samples]


def _complete(c: httpx.Client, prompt: list[int], max_tokens: int = 2) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {g: n - before.get(g, 0) for g, n in after.items() if n != before.get(g, 0)}


def test_a_document_asked_again_goes_to_the_group_holding_it(groups_app):
    doc = prompt_ids(512, seed=61)  # 8 blocks of 64
    q1, q2 = doc + prompt_ids(20, seed=62), doc + prompt_ids(25, seed=63)
    busy = doc + prompt_ids(15, seed=64)  # a third question, streamed: its group gets busy
    other = prompt_ids(512, seed=65) + prompt_ids(20, seed=66)  # another document
    before = _scrape_samples()
    with httpx.Client(base_url=groups_app, timeout=60) as c, contextlib.ExitStack() as stack:
        first = _complete(c, q1)
        # follows the document too; 4000 tokens keep it decoding through the test however
        # fast decode is, without filling its group's KV (512 + 15 + 4000 of 8192)
        busy_lines = _open_stream(stack, c, busy, 4000)
        time.sleep(1.2)  # the loads reach the router (reported every 0.5 s)
        second = _complete(c, q2)  # headroom alone would pick the other, empty group
        spread = _complete(c, other)
        next(busy_lines)  # still decoding; closing the stream aborts it
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] >= 0.9 * len(doc), second
    assert spread["prompt_tokens_details"]["cached_tokens"] == 0

    def prompt_tokens(samples):
        return _delta(
            per_group(samples, "esp_prompt_tokens_total"), per_group(before, "esp_prompt_tokens_total")
        )

    def aborts(samples):
        counts = per_group(samples, "esp_request_success_total", finished_reason="abort")
        return _delta(counts, per_group(before, "esp_request_success_total", finished_reason="abort"))

    expected = len(q1) + len(busy) + len(q2) + len(other)
    try:
        samples = wait_for_metrics(
            _metrics_url(),
            lambda s: sum(prompt_tokens(s).values()) >= expected and sum(aborts(s).values()) >= 1,
            timeout_s=40,
        )
    except AssertionError as err:
        samples = _scrape_samples()
        raise AssertionError({"prompt": prompt_tokens(samples), "aborts": aborts(samples)}) from err
    # the document's group served all three questions (and was busy when the second came:
    # its stream was still running at the end); the new document went to the other one
    by_group = prompt_tokens(samples)
    (holder,) = aborts(samples)
    assert by_group[holder] == len(q1) + len(busy) + len(q2), by_group
    assert sorted(by_group.values()) == sorted([len(q1) + len(busy) + len(q2), len(other)]), by_group
