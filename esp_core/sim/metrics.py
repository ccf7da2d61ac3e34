"""Latency metrics of a simulation, as the LoongServe paper defines them (architecture.md §5).

Per request (all in ms):
* per-token latency = (finish - arrival) / (prompt + output tokens)
* input latency     = TTFT / prompt tokens, TTFT = first token - arrival
* output latency    = TPOT = (finish - first token) / (output tokens - 1)  (0 if one token)

A run is summarised by the means (the paper's curves are means) and percentiles of each,
TTFT and TPOT p50/p99, SLO attainment (fraction of *all* requests meeting the three SLOs
at once; rejected or unfinished requests count as misses) and goodput (requests/s that met
all SLOs: attainment x offered rate, DistServe's notion of useful throughput).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from esp_core.sim.simulator import RequestRecord, SimStats


@dataclass(frozen=True)
class SLO:
    """Latency SLOs in ms: per-token, input (per prompt token), output (per output token)."""

    per_token_ms: float
    input_ms: float
    output_ms: float


# The paper's SLOs (docs/architecture.md §5). Zipf has none of its own in the paper's Figure
# 10 style (its ablation uses a TTFT/TPOT goodput instead); we use Mixed's, documented.
SLO_PRESETS: dict[str, SLO] = {
    "sharegpt": SLO(92.0, 20.0, 320.0),
    "l-eval": SLO(3.5, 1.8, 320.0),
    "lv-eval": SLO(2.5, 2.5, 365.0),
    "mixed": SLO(70.0, 90.0, 360.0),
    "mixed-2node": SLO(65.0, 64.0, 200.0),
    "zipf-1.0": SLO(70.0, 90.0, 360.0),
    "zipf-1.2": SLO(70.0, 90.0, 360.0),
    "zipf-1.4": SLO(70.0, 90.0, 360.0),
    # shared-prefix workloads (prefix_workloads.py): the SLO of the dataset they draw from
    "docqa": SLO(3.5, 1.8, 320.0),
    "multiturn": SLO(92.0, 20.0, 320.0),
}

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestLatency:
    per_token_ms: float
    input_ms: float
    output_ms: float
    ttft_s: float
    tpot_ms: float


def request_latency(r: RequestRecord) -> RequestLatency | None:
    """Latencies of a completed request; None if it was rejected or did not finish."""
    if r.finish_s is None or r.first_token_s is None or r.rejected is not None or not r.finished_ok:
        return None
    latency = r.finish_s - r.arrival_s
    ttft = r.first_token_s - r.arrival_s
    tpot = (r.finish_s - r.first_token_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    return RequestLatency(
        per_token_ms=1e3 * latency / (r.prompt_tokens + r.output_tokens),
        input_ms=1e3 * ttft / r.prompt_tokens,
        output_ms=1e3 * tpot,
        ttft_s=ttft,
        tpot_ms=1e3 * tpot,
    )


def meets(lat: RequestLatency, slo: SLO) -> bool:
    return (
        lat.per_token_ms <= slo.per_token_ms
        and lat.input_ms <= slo.input_ms
        and lat.output_ms <= slo.output_ms
    )


@dataclass(frozen=True)
class Dist:
    mean: float
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(values: Sequence[float]) -> Dist:
        if len(values) == 0:
            nan = float("nan")
            return Dist(nan, nan, nan, nan)
        a = np.asarray(values, dtype=np.float64)
        p = np.percentile(a, PERCENTILES)
        return Dist(float(a.mean()), float(p[0]), float(p[1]), float(p[2]))


@dataclass(frozen=True)
class Summary:
    num_requests: int
    completed: int
    rejected: int
    unfinished: int
    per_token_ms: Dist
    input_ms: Dist
    output_ms: Dist
    ttft_s: Dist
    tpot_ms: Dist
    slo_attainment: float
    offered_rate: float
    goodput_req_s: float
    throughput_req_s: float  # completed requests / (last finish - first arrival)
    sustained_req_s: float  # completions per second inside the arrival window (capacity
    # when the run is overloaded; see `sustained_throughput`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    records: Sequence[RequestRecord], slo: SLO | None = None, offered_rate: float | None = None
) -> Summary:
    """Summarise a run. `offered_rate` defaults to n / last arrival (a Poisson run's rate)."""
    lats = [request_latency(r) for r in records]
    done = [x for x in lats if x is not None]
    n = len(records)
    rejected = sum(1 for r in records if r.rejected is not None)
    if offered_rate is None:
        last = max((r.arrival_s for r in records), default=0.0)
        offered_rate = n / last if last > 0 else float("nan")
    ok = sum(1 for x in done if meets(x, slo)) if slo is not None else len(done)
    attainment = ok / n if n else float("nan")
    first = min((r.arrival_s for r in records), default=0.0)
    last_finish = max((r.finish_s for r in records if r.finish_s is not None), default=first)
    span = last_finish - first
    return Summary(
        num_requests=n,
        completed=len(done),
        rejected=rejected,
        unfinished=n - len(done) - rejected,
        per_token_ms=Dist.of([x.per_token_ms for x in done]),
        input_ms=Dist.of([x.input_ms for x in done]),
        output_ms=Dist.of([x.output_ms for x in done]),
        ttft_s=Dist.of([x.ttft_s for x in done]),
        tpot_ms=Dist.of([x.tpot_ms for x in done]),
        slo_attainment=attainment,
        offered_rate=offered_rate,
        goodput_req_s=attainment * offered_rate,
        throughput_req_s=len(done) / span if span > 0 else float("nan"),
        sustained_req_s=sustained_throughput(records),
    )


def sustained_throughput(records: Sequence[RequestRecord], warmup: float = 0.2) -> float:
    """Completions per second between `warmup` of the arrival window and the last arrival.

    In an overloaded run (arrivals faster than service) the system is saturated for that
    whole interval, so this is its capacity in requests/s for this request mix -- what
    the paper's SLO crossing approaches when the SLO is loose and runs are long. Warm-up
    is excluded; the drain after the last arrival (no new work) is excluded too.
    """
    if not records:
        return float("nan")
    t0 = min(r.arrival_s for r in records)
    t1 = max(r.arrival_s for r in records)
    a = t0 + warmup * (t1 - t0)
    if t1 <= a:
        return float("nan")
    n = sum(1 for r in records if r.finish_s is not None and r.rejected is None and a <= r.finish_s <= t1)
    return n / (t1 - a)


def prefix_hit_rate(stats: SimStats) -> float:
    """Prompt tokens served from a prefix cache / all prompt tokens of the run (0 for a
    policy without a cache; NaN for a run without prompts)."""
    if stats.prompt_tokens <= 0:
        return float("nan")
    return stats.cached_prompt_tokens / stats.prompt_tokens
