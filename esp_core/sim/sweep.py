"""Runs at one rate, and rate sweeps that find the max throughput at an SLO.

The paper's method (docs/architecture.md §5): run the workload at several request rates,
plot the mean latency against the rate, and report the rate at which the curve crosses
the SLO, linearly interpolated between the two measured rates around the crossing.
The main number is the crossing of the *per-token* latency; the crossings of input and
output latency are reported beside it.

Automatic rates: start at `start_rate`, multiply by `growth` until the per-token curve
crosses its SLO (or `max_points` runs), then bisect the bracketing interval `refine`
times so the interpolation runs between close points. The same requests (lengths and
order, from `seed`) are replayed at every rate; only the arrival times are rescaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from esp_core.sched.interface import Scheduler
from esp_core.sim.metrics import SLO, Summary, prefix_hit_rate, summarize
from esp_core.sim.simulator import SimResult, Simulator
from esp_core.sim.workloads import RequestSpec, with_rate

METRIC_KEYS = {
    "per_token": "per_token_latency_ms",
    "input": "input_latency_ms",
    "output": "output_latency_ms",
}

# A run "kept up" when its last request finished within this factor of the arrival
# window (measured from the first arrival). The mean per-token latency alone can stay
# under a loose SLO while a policy that favours short requests lets long ones pile up
# without bound; `max_throughput_stable_req_s` also requires the backlog to drain.
DRAIN_LIMIT = 1.25
# The automatic search stops raising the rate once a run's backlog clearly diverges
# (drain ratio above this), even if the mean latency is still under the SLO: further
# points only cost time (the scheduler slows with the queue) and say nothing new.
STOP_DRAIN = 2.5


@dataclass
class RunOutcome:
    rate: float
    result: SimResult
    summary: Summary

    def drain_ratio(self) -> float:
        recs = self.result.records
        t0 = min(r.arrival_s for r in recs)
        t1 = max(r.arrival_s for r in recs)
        return (self.result.end_s - t0) / (t1 - t0) if t1 > t0 else float("nan")

    def point(self) -> dict[str, Any]:
        s = self.summary
        return {
            "rate": self.rate,
            "num_requests": s.num_requests,
            "per_token_latency_ms": s.per_token_ms.mean,
            "input_latency_ms": s.input_ms.mean,
            "output_latency_ms": s.output_ms.mean,
            "per_token_latency_p99_ms": s.per_token_ms.p99,
            "input_latency_p99_ms": s.input_ms.p99,
            "output_latency_p99_ms": s.output_ms.p99,
            "ttft_p50_ms": 1e3 * s.ttft_s.p50,
            "ttft_p99_ms": 1e3 * s.ttft_s.p99,
            "tpot_p50_ms": s.tpot_ms.p50,
            "tpot_p99_ms": s.tpot_ms.p99,
            "slo_attainment": s.slo_attainment,
            "goodput_req_s": s.goodput_req_s,
            "sustained_req_s": s.sustained_req_s,
            "completed": s.completed,
            "rejected": s.rejected,
            "unfinished": s.unfinished,
            "sim_end_s": self.result.end_s,
            "drain_ratio": self.drain_ratio(),
            "preemptions": self.result.stats.preemptions,
            "migrations": self.result.stats.migrations,
            "cached_prompt_tokens": self.result.stats.cached_prompt_tokens,
            "prefix_hit_rate": prefix_hit_rate(self.result.stats),
        }


SchedulerFactory = Callable[[], Scheduler]


def run_once(
    make_scheduler: SchedulerFactory,
    cost_model,
    requests: Sequence[RequestSpec],
    slo: SLO | None,
    rate: float | None = None,
    validate: bool = True,
) -> RunOutcome:
    sim = Simulator(make_scheduler(), cost_model, validate=validate)
    result = sim.run(requests)
    return RunOutcome(
        rate if rate is not None else float("nan"), result, summarize(result.records, slo, offered_rate=rate)
    )


def crossing(points: Sequence[dict[str, Any]], key: str, limit: float) -> float | None:
    """Rate where `key` first rises above `limit`, linearly interpolated between the last
    point at or below it and the first above it (points sorted by rate). None when no
    point is above (the curve was not crossed in the range) or the first point already
    is (the crossing lies below the range)."""
    pts = sorted(points, key=lambda p: p["rate"])
    for prev, cur in zip(pts, pts[1:]):
        if _bad(prev, key, limit):
            return None
        if _bad(cur, key, limit):
            y0, y1 = prev[key], cur[key]
            if not math.isfinite(y1) or y1 == y0:
                return cur["rate"] if not math.isfinite(y1) else prev["rate"]
            return prev["rate"] + (limit - y0) * (cur["rate"] - prev["rate"]) / (y1 - y0)
    return None


def _bad(p: dict[str, Any], key: str, limit: float) -> bool:
    v = p[key]
    return not math.isfinite(v) or v > limit or p.get("unfinished", 0) > 0


@dataclass
class SweepResult:
    policy: str
    workload: str
    slo: SLO
    num_requests: int
    seed: int
    outcomes: list[RunOutcome] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        return [o.point() for o in sorted(self.outcomes, key=lambda o: o.rate)]

    @property
    def oom(self) -> bool:
        """Some requests can never run under this policy's memory layout (the paper's OOM)."""
        return any(o.summary.rejected for o in self.outcomes)

    def max_throughput(self, metric: str = "per_token") -> float | None:
        if self.oom:
            return None
        limit = {
            "per_token": self.slo.per_token_ms,
            "input": self.slo.input_ms,
            "output": self.slo.output_ms,
        }[metric]
        return crossing(self.points(), METRIC_KEYS[metric], limit)

    def max_throughput_stable(self) -> float | None:
        """Rate where max(per-token latency / SLO, drain ratio / DRAIN_LIMIT) crosses 1:
        under the per-token SLO *and* keeping up with the arrivals."""
        if self.oom:
            return None
        pts = []
        for p in self.points():
            q = dict(p)
            q["stability"] = max(
                p["per_token_latency_ms"] / self.slo.per_token_ms, p["drain_ratio"] / DRAIN_LIMIT
            )
            pts.append(q)
        return crossing(pts, "stability", 1.0)

    def to_json(self) -> dict[str, Any]:
        by_metric = {m: self.max_throughput(m) for m in METRIC_KEYS}
        pts = self.points()
        note = None
        if self.oom:
            note = "OOM: some requests can never fit this policy's KV layout"
        elif by_metric["per_token"] is None:
            if pts and pts[-1]["drain_ratio"] > STOP_DRAIN:
                note = (
                    f"mean per-token latency still under the SLO when the backlog "
                    f"diverged (drain ratio > {STOP_DRAIN}); see the stable number"
                )
            elif pts and not _bad(pts[0], METRIC_KEYS["per_token"], self.slo.per_token_ms):
                note = "SLO not crossed in the swept range: max throughput is above it"
            else:
                note = "SLO already violated at the lowest rate swept"
        return {
            "policy": self.policy,
            "workload": self.workload,
            "num_requests": self.num_requests,  # -1: per point (see points[].num_requests)
            "seed": self.seed,
            "slo_ms": {
                "per_token": self.slo.per_token_ms,
                "input": self.slo.input_ms,
                "output": self.slo.output_ms,
            },
            "max_throughput_req_s": by_metric["per_token"],
            "max_throughput_by_metric": by_metric,
            "max_throughput_stable_req_s": self.max_throughput_stable(),
            "drain_limit": DRAIN_LIMIT,
            "oom": self.oom,
            "note": note,
            "config": self.config,
            "points": pts,
        }


RequestSource = Sequence[RequestSpec] | Callable[[float], Sequence[RequestSpec]]


def duration_source(
    base: Sequence[RequestSpec], duration_s: float, min_requests: int = 1, seed: int = 0
) -> Callable[[float], list[RequestSpec]]:
    """The paper's protocol: at rate r send about r x `duration_s` requests (a prefix of
    `base`, so every rate replays the same lengths), re-timed as Poisson arrivals."""

    def at(rate: float) -> list[RequestSpec]:
        n = min(len(base), max(min_requests, math.ceil(rate * duration_s)))
        return with_rate(base[:n], rate, seed)

    return at


def sweep(
    make_scheduler: SchedulerFactory,
    cost_model,
    requests: RequestSource,
    slo: SLO,
    *,
    policy: str,
    workload: str,
    seed: int = 0,
    rates: Sequence[float] | None = None,
    start_rate: float = 1.0,
    growth: float = 1.6,
    max_points: int = 10,
    refine: int = 2,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    validate: bool = True,
) -> SweepResult:
    """Sweep request rates. `requests` is either a fixed list (re-timed as Poisson arrivals
    at each rate) or a function rate -> requests (e.g. `duration_source`)."""
    source = requests if callable(requests) else (lambda r: with_rate(requests, r, seed))
    n_label = -1 if callable(requests) else len(requests)
    res = SweepResult(policy, workload, slo, n_label, seed, config=config or {})
    bar = _progress(
        progress, total=len(rates) if rates else max_points + 2 * refine, desc=f"{policy}/{workload}"
    )

    def run(rate: float) -> dict[str, Any]:
        out = run_once(make_scheduler, cost_model, source(rate), slo, rate, validate)
        res.outcomes.append(out)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rate=f"{rate:.3g}", per_token_ms=f"{out.summary.per_token_ms.mean:.3g}")
        return out.point()

    try:
        if rates:
            for r in sorted(rates):
                run(r)
            return res
        _search(run, res, start_rate, growth, max_points, refine)
        return res
    finally:
        if bar is not None:
            bar.close()


def _search(
    run: Callable[[float], dict[str, Any]],
    res: SweepResult,
    start_rate: float,
    growth: float,
    max_points: int,
    refine: int,
) -> None:
    """Adaptive rates: find a stable start, walk up geometrically until the per-token
    latency crosses the SLO, then bisect around the crossing and around the stable edge."""
    key, limit = METRIC_KEYS["per_token"], res.slo.per_token_ms

    def latency_bad(p):
        return _bad(p, key, limit)

    def unstable(p):
        return latency_bad(p) or p["drain_ratio"] > DRAIN_LIMIT

    budget = max_points
    first = run(start_rate)
    budget -= 1
    lowest = start_rate
    while unstable(first) and not res.oom and budget > 0:
        # Over the SLO or not keeping up already: walk down (bounded).
        lowest /= growth
        first = run(lowest)
        budget -= 1
    if not any(latency_bad(p) for p in res.points()):
        # Walk up until the latency crosses the SLO, or the backlog clearly diverges.
        rate = max(o.rate for o in res.outcomes)
        while (
            budget > 0 and not res.oom and max(res.outcomes, key=lambda o: o.rate).drain_ratio() <= STOP_DRAIN
        ):
            rate *= growth
            budget -= 1
            if latency_bad(run(rate)):
                break
    # Bisect (geometrically) the bracket around the latency crossing, then around
    # the stable edge (latency under the SLO and the backlog draining) if it differs.
    for is_bad in (latency_bad, unstable):
        for _ in range(refine):
            ab = _bracket(res.points(), is_bad)
            if ab is None or res.oom:
                break
            run(math.sqrt(ab[0] * ab[1]))


# A long-window sweep starts this far below the short-window stable rate: at the stable
# rate a short window still drains, a long one may not quite.
PRESCAN_MARGIN = 0.9


def prescan_start_rate(prescan: SweepResult, fallback: float) -> float:
    """First rate of a long-window sweep from a short-window one (the same requests).

    With a loose per-token SLO (ShareGPT: 92 ms/token, ~100 s for a typical request) the
    crossing lies in overload, where the mean latency grows with the window: in a window
    of T seconds at a rate a fraction f above capacity the backlog adds ~f*T/2 to the mean
    latency. So the crossing of a long window (the paper's ~1000 s) lies only a little
    above the rate at which the system keeps up, which a cheap short-window sweep already
    finds (its stable edge). Starting there avoids the long runs far below capacity that
    a geometric search from a low start would spend."""
    stable = prescan.max_throughput_stable()
    if stable is None or not math.isfinite(stable):
        stable = prescan.max_throughput()
    return PRESCAN_MARGIN * stable if stable else fallback


def _bracket(points: Sequence[dict[str, Any]], is_bad) -> tuple[float, float] | None:
    """(last good rate, first bad rate) around the first bad point, if both exist."""
    pts = sorted(points, key=lambda p: p["rate"])
    for prev, cur in zip(pts, pts[1:]):
        if is_bad(prev):
            return None
        if is_bad(cur):
            return prev["rate"], cur["rate"]
    return None


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rate", leave=False)
