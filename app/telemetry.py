"""OpenTelemetry tracing of requests: a span per request in the ingress, child spans for
queueing, prefill and decode in the controller.

Off by default. Each process that traces (an ingress replica, a controller replica) builds
one `Tracing(TracingConfig)`: its own TracerProvider (the process-global provider is left
alone, so nothing else in the process is affected), a sampler honouring the caller's
sampling decision (ParentBased over TraceIdRatioBased), and the configured exporter.

Trace shape (one trace per HTTP request; the client's W3C `traceparent` is its parent):

    {operation} {model}          ingress, kind SERVER, gen_ai.* attributes   RequestSpan
    └── esp.generate             controller, the request's life in the group ControllerTracing
        ├── esp.queue            arrival -> first prefill batch dispatched
        ├── esp.prefill          one per prefill batch (chunk) holding the request:
        │                        esp.prefill.dop, esp.prefill.instances, tokens, batch id
        └── esp.decode           first decode step -> finish: esp.decode.steps, events
                                 for scale-up (esp.scale_up), pauses, preemptions

The context crosses the Ray Serve handle call as a plain dict (W3C `traceparent`, and
`tracestate` when set): `RequestSpan.carrier()` in the ingress, put into the request the
ingress sends, `ControllerTracing.on_request_arrived(request_id, carrier, ...)` in the
controller. An empty carrier makes the controller span a root (e.g. tracing off in the
ingress).

gen_ai attributes follow the OpenTelemetry GenAI semantic conventions (span name
"{gen_ai.operation.name} {gen_ai.request.model}"; operation "text_completion" or "chat").
`gen_ai.system` is the older name of `gen_ai.provider.name`; both are set.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from esp_core.sched.interface import RequestEvent
from esp_core.sched.plan import BatchResult, IterationPlan, ReleaseReason

EXPORTERS = ("off", "console", "otlp")
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4318/v1/traces"
SYSTEM_NAME = "esp-serve"  # gen_ai.system / gen_ai.provider.name
TRACER_NAME = "esp_serve"

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingConfig:
    """Tracing settings. `exporter`: off | console (stdout) | otlp (OTLP over HTTP,
    protobuf, to `otlp_endpoint`, e.g. a collector's http://host:4318/v1/traces);
    `sampling_ratio`: fraction of root traces kept (a sampled incoming `traceparent`
    is always followed)."""

    exporter: str = "off"
    otlp_endpoint: str | None = None
    service_name: str = "esp-serve"
    sampling_ratio: float = 1.0
    otlp_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"telemetry.tracing: {self.exporter!r} is not one of {EXPORTERS}")
        if not 0.0 <= self.sampling_ratio <= 1.0:
            raise ValueError(f"telemetry.sampling_ratio must be in [0, 1], got {self.sampling_ratio}")
        if self.otlp_endpoint is not None:
            url = urlparse(self.otlp_endpoint)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError(
                    "telemetry.otlp_endpoint must be an http(s) URL such as "
                    f"{DEFAULT_OTLP_ENDPOINT}, got {self.otlp_endpoint!r}"
                )
        if not self.service_name:
            raise ValueError("telemetry.service_name must not be empty")

    @classmethod
    def from_section(cls, section: Any) -> TracingConfig:
        """From the app config's telemetry section (an object or a dict) with keys
        `tracing` (or `exporter`), `otlp_endpoint`, `service_name`, `sampling_ratio`;
        missing keys keep their defaults."""
        get = section.get if isinstance(section, Mapping) else (lambda k, d=None: getattr(section, k, d))
        kwargs: dict[str, Any] = {}
        exporter = get("tracing", None) or get("exporter", None)
        if exporter is not None:
            kwargs["exporter"] = exporter
        for key in ("otlp_endpoint", "service_name", "sampling_ratio", "otlp_timeout_s"):
            val = get(key, None)
            if val is not None:
                kwargs[key] = val
        return cls(**kwargs)


def carrier_from_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """The W3C trace-context headers of an HTTP request (names lower-cased)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {k.lower(): v for k, v in items if k.lower() in ("traceparent", "tracestate")}


def context_from_carrier(carrier: Mapping[str, str] | None):
    """The OpenTelemetry context a carrier (headers or a dict from `carrier()`) names;
    an empty context (the next span is a root) when it names none or is malformed."""
    return _PROPAGATOR.extract(carrier_from_headers(carrier or {}))


def carrier_of(span: trace.Span) -> dict[str, str]:
    """A span's context as a plain dict (`traceparent`, `tracestate` if any), picklable
    and JSON-able for a Ray Serve handle call; {} for a non-recording invalid span."""
    carrier: dict[str, str] = {}
    if span.get_span_context().is_valid:
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


class Tracing:
    """The tracing of one process. `exporter` overrides the configured one (tests pass
    an InMemorySpanExporter; spans are then exported synchronously)."""

    def __init__(
        self,
        config: TracingConfig | None = None,
        *,
        exporter: SpanExporter | None = None,
        component: str = "ingress",
    ) -> None:
        self.config = config or TracingConfig()
        self.component = component
        self.enabled = exporter is not None or self.config.exporter != "off"
        self._provider: TracerProvider | None = None
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        provider = TracerProvider(
            resource=Resource.create({"service.name": self.config.service_name, "esp.component": component}),
            sampler=ParentBased(TraceIdRatioBased(self.config.sampling_ratio)),
        )
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif self.config.exporter == "console":
            # the current sys.stdout (Ray workers redirect it), not the one bound at import
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(
                        endpoint=self.config.otlp_endpoint or DEFAULT_OTLP_ENDPOINT,
                        timeout=self.config.otlp_timeout_s,
                    )
                )
            )
        self._provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        return self._provider.force_flush(timeout_millis) if self._provider else True

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()

    # ------------------------------------------------------------------ ingress side

    def start_request(
        self,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
        *,
        operation: str,
        model: str,
        request_id: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stream: bool | None = None,
        input_tokens: int | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> RequestSpan:
        """The request's span, child of the caller's `traceparent` if the headers have
        one. `operation`: "text_completion" (/v1/completions) or "chat"."""
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": SYSTEM_NAME,
            "gen_ai.provider.name": SYSTEM_NAME,
            "gen_ai.request.model": model,
            "gen_ai.response.id": request_id,
            "esp.request_id": request_id,
        }
        optional = {
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": temperature,
            "gen_ai.request.top_p": top_p,
            "esp.request.stream": stream,
            "gen_ai.usage.input_tokens": input_tokens,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        attrs.update(attributes or {})
        span = self.tracer.start_span(
            f"{operation} {model}",
            context=context_from_carrier(carrier_from_headers(headers) if headers is not None else None),
            kind=SpanKind.SERVER,
            attributes=attrs,
        )
        return RequestSpan(span)


class RequestSpan:
    """The ingress's span of one request. End it with `finish` (or `fail`) exactly once."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._start = time.monotonic()
        self._first_token: float | None = None
        self._ended = False

    def carrier(self) -> dict[str, str]:
        """What to send to the controller with the request (see the module docstring)."""
        return carrier_of(self.span)

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def set_input_tokens(self, n: int) -> None:
        self.span.set_attribute("gen_ai.usage.input_tokens", int(n))

    def first_token(self) -> None:
        if self._first_token is None:
            self._first_token = time.monotonic()
            ttft = self._first_token - self._start
            self.span.add_event("gen_ai.first_token", {"esp.latency.ttft_s": ttft})
            self.span.set_attribute("esp.latency.ttft_s", ttft)

    def finish(
        self,
        finish_reasons: Sequence[str],
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute("gen_ai.response.finish_reasons", [str(r) for r in finish_reasons])
        if input_tokens is not None:
            self.span.set_attribute("gen_ai.usage.input_tokens", int(input_tokens))
        if output_tokens is not None:
            self.span.set_attribute("gen_ai.usage.output_tokens", int(output_tokens))
        self.span.set_attribute("esp.latency.e2e_s", time.monotonic() - self._start)
        self.span.end()

    def fail(self, error_type: str, message: str = "") -> None:
        """End the span as failed (an HTTP error answered, or the stream broke)."""
        if self._ended:
            return
        self._ended = True
        self.span.set_attribute("error.type", error_type)
        self.span.set_status(Status(StatusCode.ERROR, message or error_type))
        self.span.end()


@dataclass
class _RequestTrace:
    root: trace.Span
    queue: trace.Span | None
    decode: trace.Span | None = None
    decode_steps: int = 0
    num_output_tokens: int = 0


class ControllerTracing:
    """The controller's spans of the requests of one ESP group. Fed like EngineMetrics:
    `on_request_arrived`, `on_plan` for every dispatched plan, `on_batch_result` for
    every combined batch result, `on_events` for the scheduler's events. Requests it was
    not told about are ignored."""

    def __init__(self, tracing: Tracing, group_id: str | int = "0") -> None:
        self.tracing = tracing
        self.group_id = str(group_id)
        self._requests: dict[str, _RequestTrace] = {}
        self._prefills: dict[int, list[trace.Span]] = {}  # batch id -> its request spans

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def _child(self, rt: _RequestTrace, name: str, attrs: Mapping[str, Any]) -> trace.Span:
        return self.tracing.tracer.start_span(
            name, context=trace.set_span_in_context(rt.root), attributes=dict(attrs)
        )

    def on_request_arrived(
        self, request_id: str, carrier: Mapping[str, str] | None, num_prompt_tokens: int
    ) -> None:
        if not self.tracing.enabled:
            return
        tracer = self.tracing.tracer
        root = tracer.start_span(
            "esp.generate",
            context=context_from_carrier(carrier),
            attributes={
                "esp.request_id": request_id,
                "esp.group_id": self.group_id,
                "gen_ai.usage.input_tokens": num_prompt_tokens,
            },
        )
        rt = _RequestTrace(root=root, queue=None)
        rt.queue = self._child(rt, "esp.queue", {"esp.request_id": request_id})
        self._requests[request_id] = rt

    def on_plan(self, plan: IterationPlan) -> None:
        """Prefill spans start (ending the queue span), decode spans start or count a
        step; pauses, preemptions and scale-ups become events."""
        if not self._requests:
            return
        for batch in plan.prefills:
            for item in batch.items:
                rt = self._requests.get(item.request_id)
                if rt is None:
                    continue
                if rt.queue is not None:
                    rt.queue.end()
                    rt.queue = None
                span = self._child(
                    rt,
                    "esp.prefill",
                    {
                        "esp.prefill.dop": batch.dop,
                        "esp.prefill.instances": list(batch.instances),
                        "esp.prefill.tokens": len(item.tokens),
                        "esp.prefill.chunk_start": item.tokens.start,
                        "esp.prefill.keep_instances": sorted({k.instance for k in item.keep}),
                        "esp.batch_id": batch.batch_id,
                    },
                )
                self._prefills.setdefault(batch.batch_id, []).append(span)
        for batch in plan.decodes:
            for item in batch.items:
                rt = self._requests.get(item.request_id)
                if rt is None:
                    continue
                if rt.decode is None:
                    rt.decode = self._child(rt, "esp.decode", {"esp.decode.instances": list(batch.instances)})
                rt.decode_steps += 1
                if item.holders and item.new_kv_instance not in item.holders:
                    rt.decode.add_event(
                        "esp.scale_up",
                        {
                            "esp.decode.holders": list(item.holders),
                            "esp.decode.new_kv_instance": item.new_kv_instance,
                        },
                    )
        for rid in plan.paused:
            rt = self._requests.get(rid)
            if rt is not None:
                (rt.decode or rt.root).add_event("esp.paused", {"esp.plan_id": plan.plan_id})
        for rel in plan.releases:
            rt = self._requests.get(rel.request_id)
            if rt is not None and rel.reason == ReleaseReason.PREEMPTED:
                rt.root.add_event("esp.preempted", {"esp.instances": list(rel.instances)})

    def on_batch_result(self, result: BatchResult) -> None:
        """A prefill batch completed (or failed): its prefill spans end."""
        for span in self._prefills.pop(result.batch_id, ()):
            span.set_attribute("esp.elapsed_s", result.elapsed_s)
            if result.error:
                span.set_status(Status(StatusCode.ERROR, result.error))
            span.end()

    def on_events(self, events: Iterable[RequestEvent]) -> None:
        for ev in events:
            rt = self._requests.get(ev.request_id)
            if rt is None:
                continue
            if ev.token is not None:
                if rt.num_output_tokens == 0:
                    rt.root.add_event("gen_ai.first_token")
                rt.num_output_tokens += 1
            if ev.finish_reason is not None:
                self.on_finished(
                    ev.request_id,
                    getattr(ev.finish_reason, "value", ev.finish_reason),
                    error=ev.error,
                    num_output_tokens=ev.num_output_tokens or None,
                )

    def on_finished(
        self, request_id: str, reason: str, *, error: str | None = None, num_output_tokens: int | None = None
    ) -> None:
        """End every open span of the request (also for aborts the caller initiates)."""
        rt = self._requests.pop(request_id, None)
        if rt is None:
            return
        out = rt.num_output_tokens if num_output_tokens is None else num_output_tokens
        if rt.queue is not None:
            rt.queue.end()
        if rt.decode is not None:
            rt.decode.set_attribute("esp.decode.steps", rt.decode_steps)
            rt.decode.end()
        rt.root.set_attribute("gen_ai.response.finish_reasons", [str(reason)])
        rt.root.set_attribute("gen_ai.usage.output_tokens", out)
        if error or reason == "error":
            rt.root.set_attribute("error.type", "esp.batch_failed")
            rt.root.set_status(Status(StatusCode.ERROR, error or "error"))
        rt.root.end()
