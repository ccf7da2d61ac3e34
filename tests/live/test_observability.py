"""Metrics and traces of the live ESP server after real HTTP traffic: every metric name of
docs/observability.md appears on Ray's Prometheus endpoint for this group with sane values
(a prefill of DoP 2, finishes by reason, KV gauges per instance), and the OTLP spans of a
request carry the gen_ai attributes, the prefill's DoP and instances, and hang under the
client's W3C traceparent."""

from __future__ import annotations

import pytest

from tests.observe.conftest import wait_for_metrics

from .conftest import KV_SLOTS, MODEL, NUM_INSTANCES
from .test_esp_serving import prompt_ids

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
LONG = 3000  # > KV_SLOTS of one instance: prefilled on both

HISTOGRAMS = (
    "esp_time_to_first_token_seconds",
    "esp_inter_token_latency_seconds",
    "esp_e2e_request_latency_seconds",
    "esp_request_queue_time_seconds",
    "esp_prefill_dop",
    "esp_cost_model_error_ratio",
)
# esp_scale_down_total: the ESP scheduler keeps a DoP-2 prefill's KV on one instance for
# the short prompts of this traffic (and of the earlier live tests); scale-up and
# preemption need decode-time KV pressure this traffic does not create, so those series
# are absent (a counter never incremented is not exported; tests/observe checks them)
COUNTERS = (
    "esp_prompt_tokens_total",
    "esp_generation_tokens_total",
    "esp_request_success_total",
    "esp_scale_down_total",
)
GAUGES = ("esp_num_requests_running", "esp_num_requests_waiting", "esp_kv_slots_used", "esp_kv_slots_total")


@pytest.fixture(scope="module")
def traffic(live):
    """One long traced completion, one streamed chat, one stream closed early (abort)."""
    with live.http() as c:
        r = c.post(
            "/v1/completions",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            json={
                "model": MODEL,
                "prompt": prompt_ids(LONG, seed=41),
                "max_tokens": 4,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        assert r.status_code == 200, r.text
        long_answer = r.json()
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 3,
                "ignore_eos": True,
                "stream": True,
            },
        ) as s:
            assert s.status_code == 200
            chat_body = "".join(s.iter_text())
        assert chat_body.rstrip().endswith("data: [DONE]")
        with c.stream(
            "POST",
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "abort me",
                "max_tokens": 4000,  # (of the 4,096 KV slots) the client's close lands first, also under load
                "ignore_eos": True,
                "stream": True,
            },
        ) as s:
            assert s.status_code == 200
            next(s.iter_lines())  # the first chunk, then the client goes away
    live.wait_pool_free()
    return {"long": long_answer, "group_id": live.status()["group_id"]}


def _metrics_url() -> str:
    import ray

    return f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"


def test_every_metric_is_exported_with_sane_values(live, traffic):
    from esp_serve.app.metrics import METRIC_PREFIX_AS_SCRAPED as P

    group = traffic["group_id"]

    def ours(samples):
        return [s for s in samples if s.labels.get("group_id") == group]

    def value(samples, name, **labels) -> float:
        found = [
            s.value
            for s in ours(samples)
            if s.name == P + name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, (name, labels)
        return sum(found)  # one process reports a group; sum in case of several workers

    unmet: list[str] = []  # why the last scrape was not complete (in the failure message)

    def complete(samples) -> bool:
        names = {s.name for s in ours(samples)}
        want = {P + h + "_count" for h in HISTOGRAMS} | {P + n for n in COUNTERS + GAUGES}
        reasons = {
            s.labels.get("finished_reason")
            for s in ours(samples)
            if s.name == P + "esp_request_success_total"
        }
        unmet[:] = [
            why
            for why, failed in (
                (f"missing {sorted(want - names)}", not want <= names),
                (f"finish reasons {sorted(map(str, reasons))}", not {"length", "abort"} <= reasons),
            )
            if failed
        ]
        if not unmet and value(samples, "esp_prefill_dop_bucket", le="1.0") >= value(
            samples, "esp_prefill_dop_count"
        ):
            unmet.append("no prefill of DoP >= 2")
        if not unmet and not settled(samples):
            gauges = [
                (s.name, s.labels.get("instance"), s.value)
                for s in ours(samples)
                if "num_requests" in s.name or "kv_slots" in s.name
            ]
            unmet.append(f"not settled: {gauges}")
        return not unmet

    def settled(samples) -> bool:
        """The traffic is over: the gauges, once exported, say nothing runs or waits and
        no KV is used but the prefix cache's (a gauge stuck above zero times the wait out)."""
        gauges = [P + "esp_num_requests_running", P + "esp_num_requests_waiting", P + "esp_kv_slots_used"]
        found = [s for s in ours(samples) if s.name in gauges]
        cached = {
            s.labels.get("instance"): s.value for s in ours(samples) if s.name == P + "esp_kv_slots_cached"
        }
        return len({s.name for s in found}) == 3 and all(
            s.value == (cached.get(s.labels.get("instance"), -1) if s.name.endswith("kv_slots_used") else 0)
            for s in found
        )

    try:
        samples = wait_for_metrics(_metrics_url(), complete, timeout_s=40)
    except AssertionError as err:
        raise AssertionError(f"{err}; last scrape: {unmet}") from None
    # a prefill of DoP >= 2 happened: fewer observations <= 1 than in all
    assert value(samples, "esp_prefill_dop_bucket", le="1.0") < value(samples, "esp_prefill_dop_count")
    assert value(samples, "esp_prefill_dop_bucket", le=f"{float(NUM_INSTANCES)}") == value(
        samples, "esp_prefill_dop_count"
    )  # never more than the group's instances
    assert value(samples, "esp_prompt_tokens_total") >= LONG
    assert value(samples, "esp_generation_tokens_total") >= 4 + 3 + 1
    assert value(samples, "esp_request_success_total", finished_reason="length") >= 2
    assert value(samples, "esp_request_success_total", finished_reason="abort") >= 1
    assert value(samples, "esp_scale_down_total") >= 1
    for h in (
        "esp_time_to_first_token_seconds",
        "esp_e2e_request_latency_seconds",
        "esp_request_queue_time_seconds",
    ):
        assert value(samples, h + "_count") >= 3, h
    assert value(samples, "esp_inter_token_latency_seconds_count") >= 3 + 2
    assert value(samples, "esp_cost_model_error_ratio_count") >= 1
    for i in range(NUM_INSTANCES):  # the pool is free again: nothing used
        assert value(samples, "esp_kv_slots_total", instance=str(i)) == KV_SLOTS
        # (what is still used is prefix-cache entries' KV, evicted when needed)
        used = value(samples, "esp_kv_slots_used", instance=str(i))
        assert used == value(samples, "esp_kv_slots_cached", instance=str(i)), i
    assert value(samples, "esp_num_requests_running") == 0
    assert value(samples, "esp_num_requests_waiting") == 0


def test_spans_of_a_traced_request(live, traffic):
    rid = traffic["long"]["id"]

    def ingress_span(spans):
        return [s for s in spans if s["attributes"].get("gen_ai.response.id") == rid]

    def complete(spans):
        mine = [s for s in spans if s["trace_id"] == TRACE_ID]
        names = {s["name"] for s in mine}
        return (
            bool(ingress_span(spans)) and {"esp.generate", "esp.queue", "esp.prefill", "esp.decode"} <= names
        )

    spans = live.collector.wait_for(complete, timeout_s=30)
    (root,) = ingress_span(spans)
    assert root["name"] == f"text_completion {MODEL}"
    assert root["trace_id"] == TRACE_ID and root["parent_span_id"] == PARENT_ID
    assert root["kind"] == 2  # SPAN_KIND_SERVER
    assert root["resource"]["service.name"] == "esp-live-test"
    assert root["resource"]["esp.component"] == "ingress"
    a = root["attributes"]
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.request.max_tokens"] == 4
    assert a["gen_ai.usage.input_tokens"] == LONG and a["gen_ai.usage.output_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["esp.latency.ttft_s"] > 0 and a["esp.latency.e2e_s"] >= a["esp.latency.ttft_s"]
    assert "gen_ai.first_token" in root["events"]

    mine = [s for s in spans if s["trace_id"] == TRACE_ID]
    (gen,) = [s for s in mine if s["name"] == "esp.generate"]
    assert gen["parent_span_id"] == root["span_id"]
    assert gen["resource"]["esp.component"] == "controller"
    assert gen["attributes"]["gen_ai.usage.input_tokens"] == LONG
    assert gen["attributes"]["gen_ai.usage.output_tokens"] == 4
    assert gen["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    children = [s for s in mine if s["name"] in ("esp.queue", "esp.prefill", "esp.decode")]
    assert all(s["parent_span_id"] == gen["span_id"] for s in children)
    prefills = [s for s in mine if s["name"] == "esp.prefill"]
    assert sum(s["attributes"]["esp.prefill.tokens"] for s in prefills) == LONG
    # more tokens than one instance holds: prefilled over both, in one batch or in chunks
    # (how depends on what earlier tests' prefix-cache entries hold)
    assert all(
        len(s["attributes"]["esp.prefill.instances"]) == s["attributes"]["esp.prefill.dop"] for s in prefills
    )
    used = {i for s in prefills for i in s["attributes"]["esp.prefill.instances"]}
    assert used == set(range(NUM_INSTANCES)), [s["attributes"] for s in prefills]
    (decode,) = [s for s in mine if s["name"] == "esp.decode"]
    assert decode["attributes"]["esp.decode.steps"] == 3  # tokens 2..4


def test_streamed_chat_without_traceparent_is_its_own_trace(live, traffic):
    def chat_roots(spans):
        return [
            s
            for s in spans
            if s["name"] == f"chat {MODEL}" and s["attributes"].get("esp.request.stream") is True
        ]

    def complete(spans):
        roots = chat_roots(spans)
        return bool(roots) and any(
            s["name"] == "esp.generate" and s["parent_span_id"] == roots[-1]["span_id"] for s in spans
        )

    spans = live.collector.wait_for(complete, timeout_s=30)
    root = chat_roots(spans)[-1]
    assert root["parent_span_id"] is None and root["trace_id"] != TRACE_ID
    assert root["attributes"]["gen_ai.operation.name"] == "chat"
    assert root["attributes"]["gen_ai.usage.output_tokens"] == 3
    assert root["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    aborted = [
        s
        for s in spans
        if s["name"] == "esp.generate" and s["attributes"].get("gen_ai.response.finish_reasons") == ["abort"]
    ]
    assert aborted, "the stream closed early ends its controller span as an abort"
