"""`EngineObserver`: the controller's one object for metrics and tracing.

It forwards the controller's few observation points to `EngineMetrics` (app/metrics.py)
and `ControllerTracing` (app/telemetry.py), so wiring them into the event loop is one
call per point:

    obs = EngineObserver(model_name, group_id, TracingConfig.from_section(cfg.telemetry))
    # generate(): a request was accepted (carrier: the ingress's trace context dict)
    obs.on_request_arrived(rid, len(prompt_ids), carrier, now)
    # generate()'s finally, when the caller went away before the finish:
    obs.on_aborted(rid, now)
    # a request failed outside the scheduler's events (instance lost, loop failure):
    obs.on_failed(rid, error, now)
    # _dispatch(): every plan that is dispatched
    obs.on_plan(plan, now)
    # _collect(): every combined batch result, then the scheduler's events for it
    obs.on_batch_result(result, predicted_s=None)
    obs.on_events(events, now)
    # status() or a periodic tick: per-instance KV use
    obs.set_kv(instance, used, total)

Everything is synchronous, cheap and never raises for unknown request ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from esp_core.sched.interface import RequestEvent
from esp_core.sched.plan import BatchResult, IterationPlan
from esp_serve.app.metrics import EngineMetrics, MetricSink
from esp_serve.app.telemetry import ControllerTracing, Tracing, TracingConfig


class EngineObserver:
    def __init__(
        self,
        model_name: str,
        group_id: str | int,
        tracing: TracingConfig | Tracing | None = None,
        *,
        metric_sink: MetricSink | None = None,
    ) -> None:
        self.metrics = EngineMetrics(model_name, group_id, sink=metric_sink)
        if not isinstance(tracing, Tracing):
            tracing = Tracing(tracing, component="controller")
        self.tracing = ControllerTracing(tracing, group_id)

    def on_request_arrived(
        self,
        request_id: str,
        num_prompt_tokens: int,
        carrier: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> None:
        self.metrics.on_request_arrived(request_id, num_prompt_tokens, now)
        self.tracing.on_request_arrived(request_id, carrier, num_prompt_tokens)
        self.metrics.refresh_queue_state()

    def on_aborted(self, request_id: str, now: float | None = None) -> None:
        """The caller cancelled (disconnect, stop string) before the scheduler finished
        the request. Safe to combine with the abort's own events through `on_events`:
        a request's second finish is ignored by both metrics and traces."""
        self.metrics.on_finished(request_id, "abort", now)
        self.tracing.on_finished(request_id, "abort")
        self.metrics.refresh_queue_state()

    def on_failed(self, request_id: str, error: str, now: float | None = None) -> None:
        """The controller ended the request with an error outside the scheduler's events
        (an instance died, the group is rebuilt, the scheduler loop failed)."""
        self.metrics.on_finished(request_id, "error", now)
        self.tracing.on_finished(request_id, "error", error=error)
        self.metrics.refresh_queue_state()

    def on_plan(self, plan: IterationPlan, now: float | None = None) -> None:
        self.metrics.on_plan(plan, now)
        self.tracing.on_plan(plan)

    def on_batch_result(self, result: BatchResult, predicted_s: float | None = None) -> None:
        """A batch's combined result; `predicted_s` is the cost model's estimate of its
        step time, when the scheduler has one (feeds esp_cost_model_error_ratio)."""
        self.tracing.on_batch_result(result)
        if predicted_s is not None and result.error is None:
            self.metrics.on_cost_model_error(predicted_s, result.elapsed_s, result.kind)

    def on_events(self, events: Iterable[RequestEvent], now: float | None = None) -> None:
        events = list(events)
        self.metrics.on_events(events, now)
        self.tracing.on_events(events)
        self.metrics.refresh_queue_state()

    def set_kv(self, instance: int, used: int, total: int | None = None, cached: int | None = None) -> None:
        self.metrics.set_kv_used(instance, used, total, cached)

    def shutdown(self) -> None:
        self.tracing.tracing.shutdown()
