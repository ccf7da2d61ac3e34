"""EngineMetrics' bookkeeping (what it derives from the controller's calls), checked on
the in-memory sink; the Ray endpoint test checks the same script end to end."""

from __future__ import annotations

import re

import pytest

from esp_serve.app.metrics import SPECS, EngineMetrics, InMemoryMetricSink, scraped_name
from tests.observe import metric_script as script

BRIEF_NAMES = {
    "esp_time_to_first_token_seconds",
    "esp_inter_token_latency_seconds",
    "esp_e2e_request_latency_seconds",
    "esp_request_queue_time_seconds",
    "esp_prefill_dop",
    "esp_cost_model_error_ratio",
    "esp_prompt_tokens_total",
    "esp_generation_tokens_total",
    "esp_scale_up_total",
    "esp_scale_down_total",
    "esp_preemptions_total",
    "esp_request_success_total",
    "esp_num_requests_running",
    "esp_num_requests_waiting",
    "esp_kv_slots_used",
}


def _key(name, extra, tags):
    return InMemoryMetricSink.key(name, {**tags, **dict(extra)})


def test_every_required_metric_is_declared_with_a_valid_name():
    names = {s.name for s in SPECS}
    assert BRIEF_NAMES <= names
    for s in SPECS:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", s.name)  # Ray refuses ':'
        if s.kind == "counter":
            assert s.name.endswith("_total")  # so Ray does not append a second _total
        if s.kind == "histogram":
            assert list(s.boundaries) == sorted(set(s.boundaries)) and s.boundaries[0] > 0
    assert scraped_name("esp_prefill_dop") == "ray_esp_prefill_dop"


def test_long_context_buckets_reach_minutes():
    by = {s.name: s for s in SPECS}
    assert by["esp_time_to_first_token_seconds"].boundaries[-1] >= 600
    assert by["esp_e2e_request_latency_seconds"].boundaries[-1] >= 3600


def test_script_values_on_in_memory_sink():
    sink = InMemoryMetricSink()
    m = EngineMetrics("tiny", "g0", sink=sink)
    script.play(m)
    tags = m.tags
    for (name, extra), (count, total) in script.EXPECTED_HISTOGRAMS.items():
        obs = sink.observations[_key(name, extra, tags)]
        assert len(obs) == count, name
        assert sum(obs) == pytest.approx(total), name
    for (name, extra), value in script.EXPECTED_COUNTERS.items():
        assert sink.counters[_key(name, extra, tags)] == value, name
    for (name, extra), value in script.EXPECTED_GAUGES.items():
        assert sink.gauges[_key(name, extra, tags)] == value, name
    assert sorted(sink.observations[_key("esp_inter_token_latency_seconds", (), tags)]) == pytest.approx(
        [0.1, 0.2]
    )
    assert m.num_tracked == 0  # both requests finished: nothing left behind


def test_unknown_requests_and_repeated_scheduling_are_harmless():
    sink = InMemoryMetricSink()
    t = [10.0]
    m = EngineMetrics("tiny", 3, sink=sink, clock=lambda: t[0])
    m.on_token("ghost")  # never arrived: counted as a token, not timed
    m.on_finished("ghost", "error")  # nor is its finish counted
    m.on_request_arrived("r", 10)
    t[0] = 11.0
    m.on_scheduled("r")
    t[0] = 15.0
    m.on_scheduled("r")  # a later chunk: queue time is observed once
    m.on_scale_up(0)  # zero increments are skipped (Ray refuses inc(0))
    m.on_cost_model_error(1.0, 0.0)  # no ratio for an instant batch
    tags = {"model_name": "tiny", "group_id": "3"}
    assert sink.observations[_key("esp_request_queue_time_seconds", (), tags)] == [1.0]
    assert sink.counters[_key("esp_generation_tokens_total", (), tags)] == 1
    assert not any(k[0] == "esp_request_success_total" for k in sink.counters)
    m.on_finished("r", "abort")
    m.on_finished("r", "abort")  # reported twice: counted once
    assert sink.counters[_key("esp_request_success_total", (("finished_reason", "abort"),), tags)] == 1
    assert len(sink.observations[_key("esp_e2e_request_latency_seconds", (), tags)]) == 1
    assert _key("esp_time_to_first_token_seconds", (), tags) not in sink.observations
    assert _key("esp_scale_up_total", (), tags) not in sink.counters
    assert not any(k[0] == "esp_cost_model_error_ratio" for k in sink.observations)


def test_refresh_queue_state_counts_waiting_and_running():
    sink = InMemoryMetricSink()
    m = EngineMetrics("tiny", "g", sink=sink)
    for rid in ("a", "b", "c"):
        m.on_request_arrived(rid, 5, now=0.0)
    m.on_token("a", now=1.0)
    m.refresh_queue_state()
    assert sink.gauges[_key("esp_num_requests_running", (), m.tags)] == 1
    assert sink.gauges[_key("esp_num_requests_waiting", (), m.tags)] == 2


def test_resend_gauges_sends_every_series_last_value_again():
    sink = InMemoryMetricSink()
    m = EngineMetrics("m", "g", sink=sink)
    m.set_queue_state(2, 1)
    m.set_kv_used(0, 10, 100, 4)
    m.set_kv_used(0, 12)
    before = dict(sink.gauges)
    sink.gauges.clear()
    m.resend_gauges()
    assert sink.gauges == before
    assert (
        sink.gauges[sink.key("esp_kv_slots_used", {"model_name": "m", "group_id": "g", "instance": "0"})]
        == 12
    )
