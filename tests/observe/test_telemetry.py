"""Tracing: gen_ai request spans, W3C traceparent honoured, controller child spans linked
across a serialised carrier, exporters (in-memory, console, OTLP over HTTP)."""

from __future__ import annotations

import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from esp_core.sched.interface import FinishReason, RequestEvent
from esp_core.sched.plan import BatchResult, IterationPlan, KVKeep, PrefillBatch, PrefillItem, TokenRange
from esp_serve.app.telemetry import (
    ControllerTracing,
    Tracing,
    TracingConfig,
    carrier_from_headers,
    context_from_carrier,
)
from tests.observe import trace_script

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _ingress(exporter, **kw):
    tracing = Tracing(TracingConfig(exporter="console", **kw), exporter=exporter)
    return tracing


def _start(tracing, headers):
    return tracing.start_request(
        headers,
        operation="text_completion",
        model="tiny",
        request_id="cmpl-1",
        max_tokens=16,
        temperature=0.7,
        top_p=0.9,
        stream=True,
        input_tokens=12,
    )


def test_request_span_has_gen_ai_attributes_and_honours_traceparent():
    exp = InMemorySpanExporter()
    tracing = _ingress(exp)
    rs = _start(tracing, {"Traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-other": "1"})
    rs.first_token()
    rs.finish(["length"], input_tokens=12, output_tokens=16)
    rs.finish(["stop"])  # a second end is ignored
    (span,) = exp.get_finished_spans()
    assert span.name == "text_completion tiny"
    assert span.kind.name == "SERVER"
    assert format(span.context.trace_id, "032x") == TRACE_ID == rs.trace_id
    assert format(span.parent.span_id, "016x") == PARENT_ID and span.parent.is_remote
    a = span.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.system"] == a["gen_ai.provider.name"] == "esp-serve"
    assert a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.request.temperature"] == 0.7 and a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.response.id"] == "cmpl-1"
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert a["gen_ai.usage.input_tokens"] == 12 and a["gen_ai.usage.output_tokens"] == 16
    assert a["esp.request.stream"] is True
    assert a["esp.latency.e2e_s"] >= a["esp.latency.ttft_s"] >= 0
    assert [e.name for e in span.events] == ["gen_ai.first_token"]
    assert span.resource.attributes["service.name"] == "esp-serve"


def test_without_or_with_a_malformed_traceparent_the_span_is_a_root():
    exp = InMemorySpanExporter()
    tracing = _ingress(exp)
    for headers in ({}, {"traceparent": "garbage"}, None):
        _start(tracing, headers).finish(["stop"])
    spans = exp.get_finished_spans()
    assert len(spans) == 3 and all(s.parent is None for s in spans)
    assert len({s.context.trace_id for s in spans}) == 3


def test_an_unsampled_caller_is_not_traced_and_sampling_ratio_zero_drops_roots():
    exp = InMemorySpanExporter()
    tracing = _ingress(exp)
    rs = _start(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    rs.finish(["stop"])
    carrier = rs.carrier()  # the decision travels on (flag 00), so the controller drops too
    assert carrier["traceparent"].endswith("-00")
    ct = ControllerTracing(Tracing(exporter=exp, component="controller"))
    trace_script.play(ct, "r", carrier)
    never = _ingress(exp, sampling_ratio=0.0)
    _start(never, {}).finish(["stop"])
    assert exp.get_finished_spans() == ()
    # ... but a sampled caller is followed even at ratio 0 (ParentBased)
    _start(never, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}).finish(["stop"])
    assert len(exp.get_finished_spans()) == 1


def test_controller_spans_are_children_of_the_ingress_span_across_a_serialised_carrier():
    ingress_exp, controller_exp = InMemorySpanExporter(), InMemorySpanExporter()
    ingress = _ingress(ingress_exp)
    rs = _start(ingress, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    carrier = rs.carrier()
    assert set(carrier) == {"traceparent"} and TRACE_ID in carrier["traceparent"]
    # what a Serve handle call does to it (pickle) and what a JSON hop would do
    carrier = json.loads(json.dumps(pickle.loads(pickle.dumps(carrier))))
    # a separate provider, as in the controller's process
    controller = ControllerTracing(
        Tracing(TracingConfig(exporter="console"), exporter=controller_exp, component="controller"),
        group_id="g1",
    )
    trace_script.play(controller, "cmpl-1", carrier)
    rs.finish(["length"])
    assert controller.num_tracked == 0
    (ingress_span,) = ingress_exp.get_finished_spans()
    spans = trace_script.span_dicts(controller_exp.get_finished_spans())
    trace_script.check(spans, ingress_span.context.trace_id, ingress_span.context.span_id, "cmpl-1")
    assert {s.resource.attributes["esp.component"] for s in controller_exp.get_finished_spans()} == {
        "controller"
    }


def test_failures_mark_spans_as_errors_and_aborts_close_everything():
    exp = InMemorySpanExporter()
    ct = ControllerTracing(Tracing(exporter=exp, component="controller"))
    ct.on_request_arrived("a", None, 10)
    ct.on_request_arrived("b", {}, 10)
    batch = PrefillBatch(
        1,
        (0, 1),
        tuple(PrefillItem(r, TokenRange(0, 10), 0, (KVKeep(0, (TokenRange(0, 10),)),)) for r in ("a", "b")),
    )
    ct.on_plan(IterationPlan(1, prefills=(batch,)))
    ct.on_batch_result(BatchResult(1, "prefill", (0, 1), error="instance 1 died"))
    ct.on_events([RequestEvent("a", finish_reason=FinishReason.ERROR, error="instance 1 died")])
    ct.on_finished("b", "abort")  # the client went away
    ct.on_finished("b", "abort")  # twice is harmless
    ct.on_events([RequestEvent("zzz", finish_reason=FinishReason.STOP)])  # unknown: ignored
    spans = exp.get_finished_spans()
    assert ct.num_tracked == 0
    assert sorted(s.name for s in spans) == ["esp.generate"] * 2 + ["esp.prefill"] * 2 + ["esp.queue"] * 2
    roots = {s.attributes["esp.request_id"]: s for s in spans if s.name == "esp.generate"}
    assert roots["a"].status.status_code.name == "ERROR"
    assert roots["a"].attributes["error.type"] == "esp.batch_failed"
    assert tuple(roots["b"].attributes["gen_ai.response.finish_reasons"]) == ("abort",)
    assert roots["b"].status.status_code.name == "UNSET"
    assert all(s.status.status_code.name == "ERROR" for s in spans if s.name == "esp.prefill")
    assert all(r.parent is None for r in roots.values())


def test_tracing_off_is_a_no_op():
    tracing = Tracing(TracingConfig())
    assert not tracing.enabled
    rs = _start(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    # the caller's context passes through unchanged (no span of ours in between)
    assert rs.carrier() == {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    assert _start(tracing, {}).carrier() == {}
    rs.first_token()
    rs.finish(["stop"])
    ct = ControllerTracing(tracing)
    trace_script.play(ct, "r", {})
    assert ct.num_tracked == 0
    tracing.shutdown()


def test_config_validation_and_from_section():
    assert TracingConfig().exporter == "off"
    for bad in (
        dict(exporter="jaeger"),
        dict(sampling_ratio=1.5),
        dict(otlp_endpoint="localhost:4318"),
        dict(service_name=""),
    ):
        with pytest.raises(ValueError):
            TracingConfig(**bad)

    class Section:  # shaped like app.config.TelemetrySection
        tracing = "otlp"
        otlp_endpoint = "http://127.0.0.1:4318/v1/traces"
        log_level = "INFO"

    cfg = TracingConfig.from_section(Section())
    assert (cfg.exporter, cfg.otlp_endpoint, cfg.sampling_ratio) == (
        "otlp",
        "http://127.0.0.1:4318/v1/traces",
        1.0,
    )
    cfg = TracingConfig.from_section({"tracing": "console", "service_name": "svc", "sampling_ratio": 0.25})
    assert (cfg.exporter, cfg.service_name, cfg.sampling_ratio) == ("console", "svc", 0.25)


def test_header_helpers():
    assert carrier_from_headers([("TraceParent", "x"), ("TRACESTATE", "k=v"), ("a", "b")]) == {
        "traceparent": "x",
        "tracestate": "k=v",
    }
    ctx = context_from_carrier({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"})
    from opentelemetry import trace

    sc = trace.get_current_span(ctx).get_span_context()
    assert format(sc.trace_id, "032x") == TRACE_ID and sc.trace_state.get("vendor") == "1"


def test_console_exporter_prints_spans(capsys):
    tracing = Tracing(TracingConfig(exporter="console", service_name="esp-console"))
    _start(tracing, {}).finish(["stop"])
    tracing.force_flush()
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "text_completion tiny"
    assert out["attributes"]["gen_ai.operation.name"] == "text_completion"
    assert out["resource"]["attributes"]["service.name"] == "esp-console"
    tracing.shutdown()


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Collector.received.append((self.path, self.headers.get("Content-Type"), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_exporter_posts_protobuf_to_the_configured_endpoint():
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
        tracing = Tracing(
            TracingConfig(exporter="otlp", otlp_endpoint=endpoint, service_name="esp-otlp", otlp_timeout_s=5)
        )
        _start(tracing, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}).finish(["stop"])
        assert tracing.force_flush(10_000)
        tracing.shutdown()
    finally:
        server.shutdown()
        thread.join(5)
    assert _Collector.received, "the collector got nothing"
    path, ctype, body = _Collector.received[-1]
    assert path == "/v1/traces" and ctype == "application/x-protobuf"
    req = ExportTraceServiceRequest.FromString(body)
    (rspans,) = req.resource_spans
    res = {kv.key: kv.value.string_value for kv in rspans.resource.attributes}
    assert res["service.name"] == "esp-otlp"
    (span,) = [s for ss in rspans.scope_spans for s in ss.spans]
    assert span.name == "text_completion tiny"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["gen_ai.request.model"].string_value == "tiny"
    assert attrs["gen_ai.request.max_tokens"].int_value == 16
