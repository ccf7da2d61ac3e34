"""Prometheus metrics of an ESP group, recorded through Ray's metrics API.

The controller owns one `EngineMetrics(model_name, group_id)` and tells it what happens
(request arrived, prefill started with DoP d, token sampled, request finished, ...); the
recorder turns that into vLLM-style metrics. Ray exports every process's metrics on each
node's metrics endpoint (`http://<node>:<MetricsExportPort>/metrics`, the port is
`ray.nodes()[i]["MetricsExportPort"]` or the one given to `ray start
--metrics-export-port`), from where Prometheus scrapes them. Export is periodic (Ray's
`metrics_report_interval_ms`, 10 s by default), so a value shows up seconds after it is
recorded.

Names as scraped. Ray prefixes every application metric with ``ray_``; a counter whose
name does not end in ``_total`` gets ``_total`` appended (ours all end in ``_total``, so
nothing is doubled); histograms expand to ``_bucket{le=...}``, ``_sum`` and ``_count``.
Every series also carries Ray's labels (``Component``, ``NodeAddress``, ``SessionName``,
``Version``, ``WorkerId``, ``otel_scope_*``) besides ours::

    ray_esp_time_to_first_token_seconds     histogram  model_name, group_id
    ray_esp_inter_token_latency_seconds     histogram  model_name, group_id
    ray_esp_e2e_request_latency_seconds     histogram  model_name, group_id
    ray_esp_request_queue_time_seconds      histogram  model_name, group_id
    ray_esp_prefill_dop                     histogram  model_name, group_id
    ray_esp_cost_model_error_ratio          histogram  model_name, group_id, batch_kind
    ray_esp_prompt_tokens_total             counter    model_name, group_id
    ray_esp_generation_tokens_total         counter    model_name, group_id
    ray_esp_scale_up_total                  counter    model_name, group_id
    ray_esp_scale_down_total                counter    model_name, group_id
    ray_esp_preemptions_total               counter    model_name, group_id
    ray_esp_request_success_total           counter    model_name, group_id, finished_reason
    ray_esp_num_requests_running            gauge      model_name, group_id
    ray_esp_num_requests_waiting            gauge      model_name, group_id
    ray_esp_kv_slots_used                   gauge      model_name, group_id, instance
    ray_esp_kv_slots_total                  gauge      model_name, group_id, instance
    ray_esp_kv_slots_cached                 gauge      model_name, group_id, instance
    ray_esp_prefix_cache_hit_tokens_total   counter    model_name, group_id

Histogram `_bucket` and `_count` are exact, but Ray 2.60 (OpenTelemetry recorder) rebuilds
`_sum` from bucket midpoints (the first bucket from 0, the +Inf bucket at twice the last
bound), so `_sum / _count` is only an estimate: use bucket quantiles
(`histogram_quantile`) for latency numbers; the benchmark client measures exact ones.

A series appears only once something was recorded into it (a counter never incremented
is absent, not 0). Definitions:

* TTFT: first output token minus arrival at the controller; ITL: gap between two
  consecutive output tokens of a request (a decode paused by a prefill shows up here);
  e2e: finish minus arrival; queue time: first time the request is scheduled (its first
  prefill batch is dispatched) minus arrival.
* prompt tokens count once per request, when its first token is produced (prompt
  processed); generation tokens count every output token.
* request_success counts every finished request by reason: stop, length, abort, error
  (vLLM's name; "abort" and "error" are finishes too, so failures are visible).
* prefill DoP: number of instances of each prefill batch (its ring size).
* scale_up / scale_down: ESP's elastic scaling inside a group (architecture.md §3.2, §3.3), not
  Serve's replica autoscaling. `on_plan` derives them from plans: a prefill batch whose
  KV is kept on fewer instances than its ring is a scale-down; a decode item whose new
  token's KV goes to an instance that holds none of the request's KV yet is a scale-up.
* cost_model_error_ratio: predicted / measured step time of a batch (1.0 = exact; < 1
  the model is optimistic), labelled by batch kind (prefill | decode).

Recording calls are cheap, synchronous and never raise on unknown request ids (a
request the recorder never saw is not timed and its finish not counted; its tokens still
count as generated), so they are safe inside the controller's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from esp_core.sched.interface import RequestEvent
from esp_core.sched.plan import IterationPlan, ReleaseReason

METRIC_PREFIX_AS_SCRAPED = "ray_"  # what Ray puts in front of every name on /metrics

# Bucket upper bounds (seconds unless noted). Long contexts make TTFT and e2e span five
# orders of magnitude: a 500K-token prompt takes minutes even on 8 GPUs, so the buckets
# reach an hour; at the short end they keep vLLM's resolution.
TTFT_BUCKETS_S = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
    2560.0,
)
ITL_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS_S = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    3600.0,
    7200.0,
)
QUEUE_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
    1280.0,
    2560.0,
)
DOP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)  # instances
COST_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)

BASE_TAGS = ("model_name", "group_id")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as registered; scraped as METRIC_PREFIX_AS_SCRAPED + name (+ suffixes)
    kind: str  # "histogram" | "counter" | "gauge"
    description: str
    extra_tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "esp_time_to_first_token_seconds",
        "histogram",
        "Time from arrival at the controller to the first output token.",
        boundaries=TTFT_BUCKETS_S,
    ),
    MetricSpec(
        "esp_inter_token_latency_seconds",
        "histogram",
        "Time between two consecutive output tokens of a request.",
        boundaries=ITL_BUCKETS_S,
    ),
    MetricSpec(
        "esp_e2e_request_latency_seconds",
        "histogram",
        "Time from arrival at the controller to the request's finish.",
        boundaries=E2E_BUCKETS_S,
    ),
    MetricSpec(
        "esp_request_queue_time_seconds",
        "histogram",
        "Time from arrival until the request's first prefill batch is dispatched.",
        boundaries=QUEUE_BUCKETS_S,
    ),
    MetricSpec(
        "esp_prefill_dop",
        "histogram",
        "Degree of parallelism (instances in the ring) of each prefill batch.",
        boundaries=DOP_BUCKETS,
    ),
    MetricSpec(
        "esp_cost_model_error_ratio",
        "histogram",
        "Predicted / measured step time of a batch (1 = exact).",
        extra_tags=("batch_kind",),
        boundaries=COST_RATIO_BUCKETS,
    ),
    MetricSpec(
        "esp_prompt_tokens_total",
        "counter",
        "Prompt tokens processed (counted when a request's first token is out).",
    ),
    MetricSpec("esp_generation_tokens_total", "counter", "Output tokens generated."),
    MetricSpec(
        "esp_scale_up_total",
        "counter",
        "ESP scale-up events: a request's KV spreads onto a new instance in decode.",
    ),
    MetricSpec(
        "esp_scale_down_total",
        "counter",
        "ESP scale-down events: a prefill batch keeps its KV on fewer instances.",
    ),
    MetricSpec("esp_preemptions_total", "counter", "Requests preempted (KV dropped, re-prefilled later)."),
    MetricSpec(
        "esp_request_success_total",
        "counter",
        "Finished requests by finish reason (stop, length, abort, error).",
        extra_tags=("finished_reason",),
    ),
    MetricSpec(
        "esp_num_requests_running", "gauge", "Requests that got their first token and are not finished."
    ),
    MetricSpec("esp_num_requests_waiting", "gauge", "Requests accepted but without a first token yet."),
    MetricSpec("esp_kv_slots_used", "gauge", "KV slots in use per instance.", extra_tags=("instance",)),
    MetricSpec("esp_kv_slots_total", "gauge", "KV slots per instance (capacity).", extra_tags=("instance",)),
    MetricSpec(
        "esp_kv_slots_cached",
        "gauge",
        "KV slots per instance held by prefix-cache entries (evictable; part of esp_kv_slots_used).",
        extra_tags=("instance",),
    ),
    MetricSpec(
        "esp_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens whose KV was reused from the prefix cache instead of prefilled.",
    ),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


def scraped_name(name: str) -> str:
    """The metric's family name on Ray's Prometheus endpoint."""
    return METRIC_PREFIX_AS_SCRAPED + name


class MetricSink(Protocol):
    """Where observations go: Ray's metrics in the server (`RayMetricSink`)."""

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...


class RayMetricSink:
    """Ray's `ray.util.metrics` objects, one per metric name per process.

    Several recorders in one process (e.g. tests, or two groups' controllers on a node)
    share these objects: Ray metrics are process-global by name, and the per-recorder
    identity travels in the tags.
    """

    _shared: dict[str, object] | None = None

    def __init__(self) -> None:
        if RayMetricSink._shared is None:
            RayMetricSink._shared = self._create()
        self._m = RayMetricSink._shared

    @staticmethod
    def _create() -> dict[str, object]:
        from ray.util import metrics as rm

        out: dict[str, object] = {}
        for s in SPECS:
            tags = BASE_TAGS + s.extra_tags
            if s.kind == "histogram":
                out[s.name] = rm.Histogram(
                    s.name, s.description, boundaries=list(s.boundaries), tag_keys=tags
                )
            elif s.kind == "counter":
                out[s.name] = rm.Counter(s.name, s.description, tag_keys=tags)
            else:
                out[s.name] = rm.Gauge(s.name, s.description, tag_keys=tags)
        return out

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._m[name].observe(float(value), tags=dict(tags))  # type: ignore[attr-defined]

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._m[name].inc(float(value), tags=dict(tags))  # type: ignore[attr-defined]

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._m[name].set(float(value), tags=dict(tags))  # type: ignore[attr-defined]


class InMemoryMetricSink:
    """Keeps observations in dicts keyed by (name, sorted tags): for unit tests of the
    bookkeeping and for tools that want the numbers without a Ray cluster."""

    def __init__(self) -> None:
        self.observations: dict[tuple, list[float]] = {}
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}

    @staticmethod
    def key(name: str, tags: Mapping[str, str]) -> tuple:
        return (name, tuple(sorted(tags.items())))

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.observations.setdefault(self.key(name, tags), []).append(float(value))

    def inc(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        k = self.key(name, tags)
        self.counters[k] = self.counters.get(k, 0.0) + float(value)

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self.gauges[self.key(name, tags)] = float(value)


@dataclass
class _RequestTimes:
    arrival: float
    num_prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_output_tokens: int = 0


class EngineMetrics:
    """Records one ESP group's metrics. Times are `clock()` seconds (monotonic by
    default; pass `now=` to use the caller's clock, e.g. the controller's loop time)."""

    def __init__(
        self,
        model_name: str,
        group_id: str | int,
        *,
        sink: MetricSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tags = {"model_name": str(model_name), "group_id": str(group_id)}
        self._sink = sink if sink is not None else RayMetricSink()
        self._clock = clock
        self._requests: dict[str, _RequestTimes] = {}
        # every gauge series' last value, for `resend_gauges`
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    # ------------------------------------------------------------------ primitives

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _tags(self, **extra: str) -> dict[str, str]:
        return {**self.tags, **extra}

    def _inc(self, name: str, value: float, **extra: str) -> None:
        if value > 0:  # Ray refuses inc(0); nothing to count anyway
            self._sink.inc(name, value, self._tags(**extra))

    # ------------------------------------------------------------------ requests

    def on_request_arrived(self, request_id: str, num_prompt_tokens: int, now: float | None = None) -> None:
        self._requests[request_id] = _RequestTimes(self._now(now), int(num_prompt_tokens))

    def on_scheduled(self, request_id: str, now: float | None = None) -> None:
        """The request's first prefill batch was dispatched: observe its queue time
        (once; later chunks or re-prefills do not count again)."""
        r = self._requests.get(request_id)
        if r is None or r.scheduled is not None:
            return
        r.scheduled = self._now(now)
        self._sink.observe("esp_request_queue_time_seconds", max(0.0, r.scheduled - r.arrival), self.tags)

    def on_token(self, request_id: str, now: float | None = None) -> None:
        """One output token of the request was sampled: TTFT for the first, ITL after."""
        t = self._now(now)
        r = self._requests.get(request_id)
        self._inc("esp_generation_tokens_total", 1)
        if r is None:
            return
        if r.first_token is None:
            r.first_token = t
            self._sink.observe("esp_time_to_first_token_seconds", max(0.0, t - r.arrival), self.tags)
            self._inc("esp_prompt_tokens_total", r.num_prompt_tokens)
        else:
            self._sink.observe(
                "esp_inter_token_latency_seconds", max(0.0, t - (r.last_token or t)), self.tags
            )
        r.last_token = t
        r.num_output_tokens += 1

    on_first_token = on_token  # the first call of on_token for a request is its first token

    def on_finished(self, request_id: str, reason: str, now: float | None = None) -> None:
        """The request ended (stop | length | abort | error): e2e latency and the
        finished-reason counter; its bookkeeping is dropped. Only requests announced by
        `on_request_arrived` count, once: a second finish (e.g. the caller's abort and
        the scheduler's abort event) is ignored."""
        reason = getattr(reason, "value", reason)  # FinishReason or plain str
        r = self._requests.pop(request_id, None)
        if r is None:
            return  # never arrived here, or already finished (an abort reported twice)
        self._inc("esp_request_success_total", 1, finished_reason=str(reason))
        self._sink.observe("esp_e2e_request_latency_seconds", max(0.0, self._now(now) - r.arrival), self.tags)

    # ------------------------------------------------------------------ batches, scaling

    def on_prefill(self, dop: int, request_ids: Iterable[str] = (), now: float | None = None) -> None:
        """A prefill batch on `dop` instances was dispatched with these requests."""
        self._sink.observe("esp_prefill_dop", int(dop), self.tags)
        t = self._now(now)
        for rid in request_ids:
            self.on_scheduled(rid, t)

    def on_scale_up(self, n: int = 1) -> None:
        self._inc("esp_scale_up_total", n)

    def on_scale_down(self, n: int = 1) -> None:
        self._inc("esp_scale_down_total", n)

    def on_preemption(self, n: int = 1) -> None:
        self._inc("esp_preemptions_total", n)

    def on_cost_model_error(self, predicted_s: float, measured_s: float, batch_kind: str = "prefill") -> None:
        """Predicted vs measured step time of one batch (ratio predicted / measured)."""
        if measured_s <= 0 or predicted_s < 0:
            return  # no meaningful ratio (a failed or instant batch)
        self._sink.observe(
            "esp_cost_model_error_ratio", predicted_s / measured_s, self._tags(batch_kind=batch_kind)
        )

    # ------------------------------------------------------------------ gauges

    def _set(self, name: str, value: float, tags: dict[str, str]) -> None:
        self._gauges[(name, tuple(tags.items()))] = value
        self._sink.set(name, value, tags)

    def resend_gauges(self) -> None:
        """Send every gauge series' last value again. Ray's metrics agent drops a gauge
        series not reported for ~2 export intervals, so a gauge that stops changing (an
        idle group's running/waiting/KV) would vanish from the scrape instead of holding
        its value: the owner calls this periodically."""
        for (name, tags), value in self._gauges.items():
            self._sink.set(name, value, dict(tags))

    def set_queue_state(self, running: int, waiting: int) -> None:
        self._set("esp_num_requests_running", running, self.tags)
        self._set("esp_num_requests_waiting", waiting, self.tags)

    def refresh_queue_state(self) -> None:
        """Set the running/waiting gauges from the recorder's own bookkeeping (requests
        arrived and unfinished, with or without a first token). Use this or
        `set_queue_state`, not both."""
        running = sum(1 for r in self._requests.values() if r.first_token is not None)
        self.set_queue_state(running, len(self._requests) - running)

    def set_kv_used(
        self, instance: int | str, used: int, total: int | None = None, cached: int | None = None
    ) -> None:
        tags = self._tags(instance=str(instance))
        self._set("esp_kv_slots_used", used, tags)
        if total is not None:
            self._set("esp_kv_slots_total", total, tags)
        if cached is not None:
            self._set("esp_kv_slots_cached", cached, tags)

    # ------------------------------------------------------------------ plan/event helpers

    def on_plan(self, plan: IterationPlan, now: float | None = None) -> None:
        """Everything a dispatched plan says: prefill DoPs and queue times, preemptions,
        and ESP scale-down/scale-up (definitions in the module docstring)."""
        t = self._now(now)
        for batch in plan.prefills:
            self.on_prefill(batch.dop, [it.request_id for it in batch.items], t)
            keepers = {k.instance for it in batch.items for k in it.keep}
            if keepers and len(keepers) < batch.dop:
                self.on_scale_down()
        scale_ups = sum(
            1
            for batch in plan.decodes
            for it in batch.items
            if it.holders and it.new_kv_instance not in it.holders
        )
        self.on_scale_up(scale_ups)
        self.on_preemption(sum(1 for r in plan.releases if r.reason == ReleaseReason.PREEMPTED))
        hit_tokens = sum(a.keep_len for a in plan.adoptions)
        if hit_tokens:
            self._inc("esp_prefix_cache_hit_tokens_total", hit_tokens)

    def on_events(self, events: Iterable[RequestEvent], now: float | None = None) -> None:
        """The scheduler's `update` events: tokens (TTFT/ITL/counts) and finishes."""
        t = self._now(now)
        for ev in events:
            if ev.token is not None:
                self.on_token(ev.request_id, t)
            if ev.finish_reason is not None:
                self.on_finished(ev.request_id, ev.finish_reason, t)

    @property
    def num_tracked(self) -> int:
        """Requests arrived and not finished (bounded by what the controller admits)."""
        return len(self._requests)
