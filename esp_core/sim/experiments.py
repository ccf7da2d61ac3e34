"""The short-vs-long experiment: how much do a few very long prompts hurt short requests?

LoongServe cannot interrupt a prefill, so with 5% long requests short ones wait behind
multi-second prefills (others measured 30x median / 174x P99 TTFT inflation). ESP with
chunked prefill runs short requests between chunks. The experiment:

* a Poisson stream at `rate` req/s; each request is long with probability `long_frac`
  (LV-Eval-like prompt, 15K - 497K tokens) or short (ShareGPT-like);
* the same stream with the long requests removed (same arrival times of the short ones);
* report the short requests' TTFT p50/p99 in both runs and the ratio mixed / short-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from esp_core.sched.interface import Scheduler
from esp_core.sim.metrics import Dist, request_latency
from esp_core.sim.simulator import Simulator
from esp_core.sim.workloads import RequestSpec, poisson_arrivals, sample_lengths


def short_long_workload(n: int, rate: float, long_frac: float = 0.05, seed: int = 0) -> list[RequestSpec]:
    rng = np.random.default_rng([seed, 7])
    is_long = rng.random(n) < long_frac
    sp, so = sample_lengths("sharegpt", n, seed)
    lp, lo = sample_lengths("lv-eval", n, seed + 1)
    t = poisson_arrivals(np.random.default_rng([seed, 1]), n, rate)
    return [
        RequestSpec(
            f"{'L' if is_long[i] else 's'}{i}",
            float(t[i]),
            int(lp[i] if is_long[i] else sp[i]),
            int(lo[i] if is_long[i] else so[i]),
        )
        for i in range(n)
    ]


def is_short(spec_or_record) -> bool:
    return spec_or_record.request_id.startswith("s")


@dataclass
class ShortLongResult:
    policy: str
    rate: float
    long_frac: float
    num_requests: int
    num_long: int
    mixed_ttft_s: Dist  # short requests, with the long ones present
    alone_ttft_s: Dist  # short requests, short-only run
    mixed_completed: int
    alone_completed: int

    @property
    def p99_ratio(self) -> float:
        return self.mixed_ttft_s.p99 / self.alone_ttft_s.p99

    @property
    def p50_ratio(self) -> float:
        return self.mixed_ttft_s.p50 / self.alone_ttft_s.p50

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "rate": self.rate,
            "long_frac": self.long_frac,
            "num_requests": self.num_requests,
            "num_long": self.num_long,
            "short_ttft_ms_with_long": {
                "p50": 1e3 * self.mixed_ttft_s.p50,
                "p99": 1e3 * self.mixed_ttft_s.p99,
            },
            "short_ttft_ms_alone": {"p50": 1e3 * self.alone_ttft_s.p50, "p99": 1e3 * self.alone_ttft_s.p99},
            "p50_ratio": self.p50_ratio,
            "p99_ratio": self.p99_ratio,
            "completed": {"with_long": self.mixed_completed, "alone": self.alone_completed},
        }


def _short_ttfts(
    make_scheduler: Callable[[], Scheduler], cost_model, requests: list[RequestSpec]
) -> tuple[Dist, int]:
    res = Simulator(make_scheduler(), cost_model).run(requests)
    lats = [request_latency(r) for r in res.records]
    done = sum(1 for x in lats if x is not None)
    ttfts = [x.ttft_s for r, x in zip(res.records, lats) if x is not None and is_short(r)]
    return Dist.of(ttfts), done


def run_short_long(
    make_scheduler: Callable[[], Scheduler],
    cost_model,
    *,
    policy: str,
    n: int,
    rate: float,
    long_frac: float = 0.05,
    seed: int = 0,
) -> ShortLongResult:
    mixed = short_long_workload(n, rate, long_frac, seed)
    alone = [r for r in mixed if is_short(r)]
    m, m_done = _short_ttfts(make_scheduler, cost_model, mixed)
    a, a_done = _short_ttfts(make_scheduler, cost_model, alone)
    return ShortLongResult(policy, rate, long_frac, n, len(mixed) - len(alone), m, a, m_done, a_done)
