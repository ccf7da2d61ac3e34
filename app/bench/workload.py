"""What the benchmark sends and when: request specs from a JSONL trace, from the
simulator's dataset-like generators (esp_core.sim.workloads, when present), or from a
uniform synthetic generator; Poisson re-timing for rate sweeps.

Trace format (JSONL, one request per line, the simulator's format)::

    {"arrival_s": 0.123, "prompt_tokens": 1534, "output_tokens": 212, "id": "r0"}

("id" optional). The same lengths are offered at every rate of a sweep, re-timed as a
Poisson process, as the LoongServe paper replays one sample at several rates.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

MAX_REQUESTS = 100_000  # hard bound on one run, whatever the trace or flags say
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class RequestSpec:
    """One request: when it is sent (seconds after the run starts) and its lengths."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"{self.request_id}: prompt and output lengths must be >= 1")
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise ValueError(f"{self.request_id}: arrival_s must be finite and >= 0")


def read_trace(path: str | Path, limit: int | None = None) -> list[RequestSpec]:
    """A JSONL trace, sorted by arrival; at most `limit` (and MAX_REQUESTS) requests."""
    out: list[RequestSpec] = []
    cap = min(limit or MAX_REQUESTS, MAX_REQUESTS)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(RequestSpec(str(d.get("id", f"r{len(out)}")), float(d["arrival_s"]),
                                       int(d["prompt_tokens"]), int(d["output_tokens"])))
            except (KeyError, ValueError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
            if len(out) >= cap:
                break
    out.sort(key=lambda r: r.arrival_s)
    return out


def write_trace(path: str | Path, requests: Sequence[RequestSpec]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"id": r.request_id, "arrival_s": r.arrival_s,
                                "prompt_tokens": r.prompt_tokens,
                                "output_tokens": r.output_tokens}) + "\n")


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets of a Poisson process of `rate` req/s (rate = inf: all at 0)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def with_rate(requests: Sequence[RequestSpec], rate: float, seed: int) -> list[RequestSpec]:
    """The same requests (lengths, order) re-timed as a Poisson process of `rate` req/s."""
    times = poisson_arrivals(len(requests), rate, seed)
    return [RequestSpec(r.request_id, t, r.prompt_tokens, r.output_tokens)
            for r, t in zip(requests, times)]


def synthetic(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
              seed: int) -> list[RequestSpec]:
    """Uniform prompt/output lengths in the inclusive ranges, arrivals all 0 (re-time
    with `with_rate`)."""
    for lo, hi in (prompt_range, output_range):
        if not 1 <= lo <= hi:
            raise ValueError(f"length range {lo}:{hi} must satisfy 1 <= lo <= hi")
    rng = random.Random(f"lengths-{seed}")
    return [RequestSpec(f"r{i}", 0.0, rng.randint(*prompt_range), rng.randint(*output_range))
            for i in range(n)]


def dataset_workload(name: str, n: int, seed: int) -> list[RequestSpec]:
    """Lengths from the simulator's dataset-like generators (sharegpt, l-eval, lv-eval,
    mixed, zipf-*), arrivals all 0. Needs esp_core.sim.workloads."""
    try:
        from esp_core.sim import workloads as sim_workloads
    except ImportError as err:  # the simulator is not in this checkout
        raise ValueError(f"workload {name!r} needs esp_core.sim.workloads ({err}); "
                         f"use --workload {SYNTHETIC} or --trace") from None
    prompts, outputs = sim_workloads.sample_lengths(name, n, seed)
    return [RequestSpec(f"r{i}", 0.0, int(p), int(o))
            for i, (p, o) in enumerate(zip(prompts, outputs))]


def clip_lengths(requests: Sequence[RequestSpec], max_prompt: int | None,
                 max_output: int | None) -> list[RequestSpec]:
    """Cap lengths (e.g. to what a small CPU model serves); the cap is reported."""
    return [RequestSpec(r.request_id, r.arrival_s,
                        min(r.prompt_tokens, max_prompt or r.prompt_tokens),
                        min(r.output_tokens, max_output or r.output_tokens)) for r in requests]


def describe(requests: Sequence[RequestSpec]) -> dict[str, Any]:
    if not requests:
        return {"num_requests": 0}
    p = [r.prompt_tokens for r in requests]
    o = [r.output_tokens for r in requests]
    return {"num_requests": len(requests), "prompt_tokens": {"min": min(p), "max": max(p),
                                                             "mean": sum(p) / len(p)},
            "output_tokens": {"min": min(o), "max": max(o), "mean": sum(o) / len(o)},
            "last_arrival_s": max(r.arrival_s for r in requests)}
