"""EngineObserver feeds both metrics and traces from the controller's observation points."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from esp_core.sched.interface import FinishReason, RequestEvent
from esp_core.sched.plan import (
    BatchResult,
    IterationPlan,
    KVKeep,
    PrefillBatch,
    PrefillItem,
    SampledToken,
    TokenRange,
)
from esp_serve.app.metrics import InMemoryMetricSink
from esp_serve.app.observer import EngineObserver
from esp_serve.app.telemetry import Tracing

TP = "00-" + "12" * 16 + "-" + "34" * 8 + "-01"


def test_one_request_and_one_abort_through_the_observer():
    sink, exporter = InMemoryMetricSink(), InMemorySpanExporter()
    obs = EngineObserver("tiny", "g7", Tracing(exporter=exporter, component="controller"), metric_sink=sink)
    tags = {"model_name": "tiny", "group_id": "g7"}
    key = InMemoryMetricSink.key

    obs.on_request_arrived("a", 20, {"traceparent": TP}, now=0.0)
    obs.on_request_arrived("b", 30, None, now=0.0)
    assert sink.gauges[key("esp_num_requests_waiting", tags)] == 2
    batch = PrefillBatch(
        1, (0, 1), (PrefillItem("a", TokenRange(0, 20), 0, (KVKeep(0, (TokenRange(0, 20),)),)),)
    )
    obs.on_plan(IterationPlan(1, prefills=(batch,)), now=0.25)
    result = BatchResult(1, "prefill", (0, 1), (SampledToken("a", 3),), elapsed_s=0.5)
    obs.on_batch_result(result, predicted_s=0.25)
    obs.on_events([RequestEvent("a", token=SampledToken("a", 3))], now=1.0)
    assert sink.gauges[key("esp_num_requests_running", tags)] == 1
    obs.on_events(
        [RequestEvent("a", finish_reason=FinishReason.STOP, num_prompt_tokens=20, num_output_tokens=1)],
        now=1.0,
    )
    obs.on_aborted("b", now=2.0)
    obs.set_kv(0, 7, 100)

    assert sink.observations[key("esp_request_queue_time_seconds", tags)] == [0.25]
    assert sink.observations[key("esp_time_to_first_token_seconds", tags)] == [1.0]
    assert sink.observations[key("esp_e2e_request_latency_seconds", tags)] == [1.0, 2.0]
    assert sink.observations[key("esp_prefill_dop", tags)] == [2]
    assert sink.observations[key("esp_cost_model_error_ratio", {**tags, "batch_kind": "prefill"})] == [0.5]
    assert sink.counters[key("esp_scale_down_total", tags)] == 1
    assert sink.counters[key("esp_request_success_total", {**tags, "finished_reason": "stop"})] == 1
    assert sink.counters[key("esp_request_success_total", {**tags, "finished_reason": "abort"})] == 1
    assert sink.gauges[key("esp_num_requests_running", tags)] == 0
    assert sink.gauges[key("esp_num_requests_waiting", tags)] == 0
    assert sink.gauges[key("esp_kv_slots_used", {**tags, "instance": "0"})] == 7

    spans = exporter.get_finished_spans()
    roots = {s.attributes["esp.request_id"]: s for s in spans if s.name == "esp.generate"}
    assert format(roots["a"].context.trace_id, "032x") == "12" * 16
    assert tuple(roots["a"].attributes["gen_ai.response.finish_reasons"]) == ("stop",)
    assert tuple(roots["b"].attributes["gen_ai.response.finish_reasons"]) == ("abort",)
    assert sorted(s.name for s in spans) == [
        "esp.generate",
        "esp.generate",
        "esp.prefill",
        "esp.queue",
        "esp.queue",
    ]
    obs.shutdown()


def test_tracing_off_by_default():
    obs = EngineObserver("tiny", 0, metric_sink=InMemoryMetricSink())
    assert not obs.tracing.tracing.enabled
    obs.on_request_arrived("x", 5, {"traceparent": TP})
    obs.on_aborted("x")
    assert obs.metrics.num_tracked == 0 and obs.tracing.num_tracked == 0
