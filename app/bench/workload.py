"""What the benchmark sends and when: request specs from a JSONL trace, from the
simulator's dataset-like generators (esp_core.sim.workloads), or from a
uniform synthetic generator; Poisson re-timing for rate sweeps.

Trace format (JSONL, one request per line, the simulator's format)::

    {"arrival_s": 0.123, "prompt_tokens": 1534, "output_tokens": 212, "id": "r0"}

("id" optional). The same lengths are offered at every rate of a sweep, re-timed as a
Poisson process, as the LoongServe paper replays one sample at several rates.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# One request spec and one trace format for the simulator and this benchmark: a trace
# recorded for one replays in the other.
from esp_core.sim.workloads import RequestSpec, write_trace
from esp_core.sim.workloads import read_trace as _read_trace
from esp_core.sim.workloads import with_rate as _sim_with_rate

__all__ = [
    "RequestSpec",
    "read_trace",
    "write_trace",
    "poisson_arrivals",
    "with_rate",
    "synthetic",
    "dataset_workload",
    "clip_lengths",
    "describe",
]

MAX_REQUESTS = 100_000  # hard bound on one run, whatever the trace or flags say
SYNTHETIC = "synthetic"


def read_trace(path: str | Path, limit: int | None = None) -> list[RequestSpec]:
    """A JSONL trace, sorted by arrival; at most `limit` (and MAX_REQUESTS) requests."""
    return _read_trace(path, limit=min(limit or MAX_REQUESTS, MAX_REQUESTS))


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets of a Poisson process of `rate` req/s (rate = inf: all at 0), drawn
    as the simulator draws them, so a bench run and a simulated run see the same times."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    return [r.arrival_s for r in with_rate([RequestSpec("t", 0.0, 1, 1)] * n, rate, seed)]


def with_rate(requests: Sequence[RequestSpec], rate: float, seed: int) -> list[RequestSpec]:
    """The same requests (lengths, order) re-timed as a Poisson process of `rate` req/s
    (the simulator's re-timing; rate = inf sends everything at 0)."""
    if math.isinf(rate):
        return [RequestSpec(r.request_id, 0.0, r.prompt_tokens, r.output_tokens) for r in requests]
    return _sim_with_rate(requests, rate, seed)


def synthetic(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> list[RequestSpec]:
    """Uniform prompt/output lengths in the inclusive ranges, arrivals all 0 (re-time
    with `with_rate`)."""
    for lo, hi in (prompt_range, output_range):
        if not 1 <= lo <= hi:
            raise ValueError(f"length range {lo}:{hi} must satisfy 1 <= lo <= hi")
    rng = random.Random(f"lengths-{seed}")
    return [
        RequestSpec(f"r{i}", 0.0, rng.randint(*prompt_range), rng.randint(*output_range)) for i in range(n)
    ]


def dataset_workload(name: str, n: int, seed: int) -> list[RequestSpec]:
    """Lengths from the simulator's dataset-like generators (sharegpt, l-eval, lv-eval,
    mixed, zipf-*), arrivals all 0."""
    from esp_core.sim import workloads as sim_workloads

    if name not in sim_workloads.WORKLOADS:
        raise ValueError(
            f"unknown workload {name!r}; choose from {SYNTHETIC}, "
            f"{', '.join(sim_workloads.WORKLOADS)}, or pass --trace"
        )
    prompts, outputs = sim_workloads.sample_lengths(name, n, seed)
    return [RequestSpec(f"r{i}", 0.0, int(p), int(o)) for i, (p, o) in enumerate(zip(prompts, outputs))]


def clip_lengths(
    requests: Sequence[RequestSpec], max_prompt: int | None, max_output: int | None
) -> list[RequestSpec]:
    """Cap lengths (e.g. to what a small CPU model serves); the cap is reported."""
    return [
        RequestSpec(
            r.request_id,
            r.arrival_s,
            min(r.prompt_tokens, max_prompt or r.prompt_tokens),
            min(r.output_tokens, max_output or r.output_tokens),
        )
        for r in requests
    ]


def describe(requests: Sequence[RequestSpec]) -> dict[str, Any]:
    if not requests:
        return {"num_requests": 0}
    p = [r.prompt_tokens for r in requests]
    o = [r.output_tokens for r in requests]
    return {
        "num_requests": len(requests),
        "prompt_tokens": {"min": min(p), "max": max(p), "mean": sum(p) / len(p)},
        "output_tokens": {"min": min(o), "max": max(o), "mean": sum(o) / len(o)},
        "last_arrival_s": max(r.arrival_s for r in requests),
    }
