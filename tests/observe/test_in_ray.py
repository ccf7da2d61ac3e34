"""In a real Ray cluster: metrics recorded inside an actor appear on Ray's Prometheus
endpoint under the documented names, labels and values; a trace carrier passed through a
Ray Serve handle call makes the controller's spans children of the ingress span.
One module, so the cluster starts once."""

from __future__ import annotations

import uuid

import pytest

from tests.observe import metric_script as script
from tests.observe import trace_script
from tests.observe.conftest import wait_for_metrics

pytestmark = pytest.mark.slow


def midpoint_sum(values, bounds) -> float:
    """Ray's estimate of a histogram's sum: each value counted at its bucket's midpoint
    (the first bucket from 0, the +Inf bucket at twice the last bound)."""
    total = 0.0
    for v in values:
        i = next((k for k, b in enumerate(bounds) if v <= b), len(bounds))
        if i == len(bounds):
            total += 2.0 * bounds[-1]
        else:
            total += (bounds[i] + (bounds[i - 1] if i else 0.0)) / 2.0
    return total


def _labels_match(sample, tags, extra) -> bool:
    want = {**tags, **dict(extra)}
    return all(sample.labels.get(k) == v for k, v in want.items())


def test_metrics_from_an_actor_reach_the_endpoint(ray_cluster):
    import ray

    from esp_serve.app.metrics import METRIC_PREFIX_AS_SCRAPED as P
    from esp_serve.app.metrics import SPEC_BY_NAME, EngineMetrics, InMemoryMetricSink

    group = f"g-{uuid.uuid4().hex[:8]}"  # isolates this test's series on a shared cluster
    tags = {"model_name": "tiny-model", "group_id": group}

    @ray.remote(num_cpus=0)
    class Controller:
        def play(self) -> int:
            from esp_serve.app.metrics import EngineMetrics

            self.m = EngineMetrics("tiny-model", group)  # kept alive: gauges stay exported
            script.play(self.m)
            return self.m.num_tracked

    actor = Controller.remote()
    assert ray.get(actor.play.remote(), timeout=60) == 0

    def ours(samples):
        return [s for s in samples if s.labels.get("group_id") == group]

    def complete(samples):
        names = {s.name for s in ours(samples)}
        return {
            P + "esp_kv_slots_total",
            P + "esp_cost_model_error_ratio_count",
            P + "esp_request_success_total",
        } <= names

    samples = ours(wait_for_metrics(ray_cluster, complete))

    def value(name, extra=()):
        found = [s.value for s in samples if s.name == name and _labels_match(s, tags, extra)]
        assert len(found) == 1, (name, extra, found)
        return found[0]

    # Histograms: the exact observations come from replaying the script in memory.
    # Buckets and counts are exact on the endpoint; Ray 2.60 rebuilds `_sum` from bucket
    # midpoints (open_telemetry_metric_recorder), so it is either exact or that estimate.
    exact = InMemoryMetricSink()
    script.play(EngineMetrics("tiny-model", group, sink=exact))
    for (name, extra), (count, _) in script.EXPECTED_HISTOGRAMS.items():
        obs = exact.observations[InMemoryMetricSink.key(name, {**tags, **dict(extra)})]
        bounds = SPEC_BY_NAME[name].boundaries
        assert value(P + name + "_count", extra) == count, name
        for b in bounds:
            assert value(P + name + "_bucket", (*extra, ("le", str(float(b))))) == sum(
                1 for v in obs if v <= b
            ), (name, b)
        assert value(P + name + "_bucket", (*extra, ("le", "+Inf"))) == count, name
        assert value(P + name + "_sum", extra) in (
            pytest.approx(sum(obs)),
            pytest.approx(midpoint_sum(obs, bounds)),
        ), name
    for (name, extra), expected in script.EXPECTED_COUNTERS.items():
        assert value(P + name, extra) == expected, name
    for (name, extra), expected in script.EXPECTED_GAUGES.items():
        assert value(P + name, extra) == expected, name
    # every series of ours carries exactly our labels plus Ray's own
    ray_labels = {
        "Component",
        "NodeAddress",
        "SessionName",
        "Version",
        "WorkerId",
        "le",
        "otel_scope_name",
        "otel_scope_schema_url",
        "otel_scope_version",
    }
    for s in samples:
        extra = set(s.labels) - ray_labels - set(tags)
        assert extra <= {"finished_reason", "instance", "batch_kind"}, s
    ray.kill(actor)


def test_trace_context_crosses_a_serve_handle_call(ray_cluster):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from ray import serve

    from esp_serve.app.telemetry import Tracing

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class TraceProbe:
        """Stands where the controller stands: tracing in its own process."""

        def __init__(self) -> None:
            from esp_serve.app.telemetry import ControllerTracing, Tracing

            self.exporter = InMemorySpanExporter()
            self.tracing = ControllerTracing(
                Tracing(exporter=self.exporter, component="controller"), group_id="g"
            )

        def generate(self, request_id: str, carrier: dict) -> list[dict]:
            trace_script.play(self.tracing, request_id, carrier)
            return trace_script.span_dicts(self.exporter.get_finished_spans())

    started_serve = not _serve_running()  # else reuse the Serve another test area started
    if started_serve:
        serve.start(proxy_location="Disabled")
    name = f"observe-trace-probe-{uuid.uuid4().hex[:6]}"
    handle = serve.run(TraceProbe.bind(), name=name, route_prefix=None)
    try:
        ingress_exp = InMemorySpanExporter()
        ingress = Tracing(exporter=ingress_exp)
        rs = ingress.start_request(
            {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"},
            operation="chat",
            model="tiny",
            request_id="chatcmpl-9",
        )
        spans = handle.generate.remote("chatcmpl-9", rs.carrier()).result(timeout_s=60)
        rs.finish(["length"], output_tokens=3)
        (ingress_span,) = ingress_exp.get_finished_spans()
        assert ingress_span.name == "chat tiny"
        assert ingress_span.context.trace_id == int("ab" * 16, 16)
        trace_script.check(spans, ingress_span.context.trace_id, ingress_span.context.span_id, "chatcmpl-9")
    finally:
        serve.delete(name)
        if started_serve:
            serve.shutdown()


def _serve_running() -> bool:
    try:
        from ray import serve

        serve.context._get_global_client()
        return True
    except Exception:
        return False
