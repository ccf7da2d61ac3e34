"""Summary statistics of one benchmark run.

Latencies (all reported in ms) per successful request, as vLLM's benchmark and the
LoongServe paper define them (architecture.md §5):
* ttft, tpot = (e2e - ttft) / (output - 1), itl (every chunk gap of every request), e2el;
* per_token = e2e / (prompt + output), input = ttft / prompt, output = tpot.
Goodput (DistServe): requests meeting every given SLO per second of the run;
`slo_attainment` is their fraction of *all* requests (failed ones count as misses).
Duration: first send -> last finish.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from esp_serve.app.bench.client import RequestResult

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "itl", "e2el", "per_token", "input", "output")  # all in ms


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (ms)."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, val = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"goodput SLO {item!r}: expected KEY:MS with KEY in {SLO_KEYS}")
        ms = float(val)
        if not ms > 0:
            raise ValueError(f"goodput SLO {item!r}: the value must be > 0 ms")
        slos[key] = ms
    return slos


def dist(values_ms: Sequence[float]) -> dict[str, float | None]:
    if len(values_ms) == 0:
        return {"mean": None, "std": None, "min": None, "max": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values_ms, dtype=np.float64)
    pct = np.percentile(a, PERCENTILES)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)},
    }


def request_latencies_ms(r: RequestResult) -> dict[str, float]:
    """The per-request latencies SLOs are checked against (ok requests only)."""
    assert r.ttft_s is not None and r.e2e_s is not None
    tpot = r.tpot_s or 0.0
    return {
        "ttft": 1e3 * r.ttft_s,
        "tpot": 1e3 * tpot,
        "itl": 1e3 * max(r.itl_s, default=0.0),  # the request's worst gap
        "e2el": 1e3 * r.e2e_s,
        "per_token": 1e3 * r.e2e_s / max(1, r.prompt_tokens + r.output_tokens),
        "input": 1e3 * r.ttft_s / max(1, r.prompt_tokens),
        "output": 1e3 * tpot,
    }


def summarize(
    results: Sequence[RequestResult], slos: Mapping[str, float] | None = None, rate: float | None = None
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    if results:
        start = min(r.send_s for r in results)
        ends = [r.send_s + r.e2e_s for r in ok if r.e2e_s is not None]
        duration = max(ends, default=start) - start
    else:
        duration = 0.0
    lats = [request_latencies_ms(r) for r in ok]
    slos = dict(slos or {})
    good = sum(1 for lat in lats if all(lat[k] <= v for k, v in slos.items()))
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    errors: dict[str, int] = {}
    for r in failed:
        key = (r.error or "unknown").split(":")[0][:80]
        errors[key] = errors.get(key, 0) + 1
    return {
        "rate": rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "errors": errors,
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "output_tokens_short": sum(1 for r in ok if r.output_tokens != r.output_tokens_wanted),
        "ttft_ms": dist([x["ttft"] for x in lats]),
        "tpot_ms": dist([x["tpot"] for x in lats]),
        "itl_ms": dist([1e3 * g for r in ok for g in r.itl_s]),
        "e2el_ms": dist([x["e2el"] for x in lats]),
        "per_token_latency_ms": dist([x["per_token"] for x in lats]),
        "input_latency_ms": dist([x["input"] for x in lats]),
        "output_latency_ms": dist([x["output"] for x in lats]),
        "slos_ms": slos,
        "good_requests": good if slos else None,
        "slo_attainment": (good / len(results) if results else None) if slos else None,
        "goodput_req_s": per_s(good) if slos else None,
        # how late the client sent requests vs the planned arrivals (a loaded client
        # machine distorts the offered rate; check this before trusting a run)
        "send_lag_ms": dist([1e3 * max(0.0, r.send_s - r.arrival_s) for r in results]),
    }
