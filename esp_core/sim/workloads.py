"""Workloads for the simulator: arrival processes, dataset-like length generators, traces.

No dataset can be downloaded on the machines this project runs on, so the paper's
datasets are *synthetic approximations*: length distributions chosen to match the
published ranges (architecture.md §5) and what is known of each dataset's
shape. They are not the datasets; every number below says where it comes from.

* ShareGPT (LoongServe's preprocessing: multi-turn chats of >= 3 turns, prompt = the
  first turns joined, outputs < 1000 tokens): prompt 4 - 2.3K tokens, lognormal with
  median 600 (multi-turn prompts are longer than single-turn ShareGPT's ~250);
  output lognormal median 250, 4 - 999 tokens.
* L-Eval (long documents + instruction): prompt 2.7K - 210.5K, lognormal median 12K
  (sigma 1.0, so a heavy right tail to the 210K maximum); answers are short to medium
  (QA and summaries): lognormal median 80, 4 - 1000 tokens.
* LV-Eval: five length levels (16K, 32K, 64K, 128K, 256K words) with equal counts (the
  benchmark's design); in tokens the paper reports 15.1K - 497.3K, so the levels are
  centred at 21K, 42K, 84K, 168K, 336K tokens with a lognormal spread of 0.15; answers are
  keyword phrases: lognormal median 20, 2 - 200 tokens.
* Mixed: equal parts of the three above, shuffled (the paper samples 1500 of each).
* Zipf alpha: prompt length x in [10, 200000) with weight 1/x^alpha (as the original
  artifact draws it), output length from the dataset such a prompt would come from:
  ShareGPT-like for x <= 2.3K, L-Eval-like up to 15.1K, LV-Eval-like beyond.

Arrivals: Poisson (exponential gaps) or bursty (gamma gaps with the same mean rate and
coefficient of variation `cv` > 1).

Trace format (JSONL, one request per line)::

    {"arrival_s": 0.123, "prompt_tokens": 1534, "output_tokens": 212}

Optional fields: "id" (kept when present) and "block_hashes" (the prompt's prefix-cache
hash chain, see prefix_workloads.py). Mooncake-format traces are read by
`prefix_workloads.read_mooncake_trace`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("sharegpt", "l-eval", "lv-eval", "mixed", "zipf-1.0", "zipf-1.2", "zipf-1.4")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: when it arrives and how long its prompt and output are."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # prefix-cache hash chain of the prompt's full blocks (NewRequest.block_hashes): empty
    # for workloads without shared prefixes
    block_hashes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # checked once here so traces, generators and the serving benchmark agree
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"{self.request_id}: prompt and output lengths must be >= 1")
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise ValueError(f"{self.request_id}: arrival_s must be finite and >= 0")


@dataclass(frozen=True)
class LengthRange:
    """Published [min, max] prompt range of a dataset (tokens)."""

    lo: int
    hi: int


# Published prompt ranges (architecture.md §5); tests check samples stay inside.
PROMPT_RANGES: dict[str, LengthRange] = {
    "sharegpt": LengthRange(4, 2_300),
    "l-eval": LengthRange(2_700, 210_500),
    "lv-eval": LengthRange(15_100, 497_300),
    "zipf": LengthRange(10, 199_999),
}
OUTPUT_RANGES: dict[str, LengthRange] = {
    "sharegpt": LengthRange(4, 999),
    "l-eval": LengthRange(4, 1_000),
    "lv-eval": LengthRange(2, 200),
}

LengthSampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _lognormal_clipped(
    rng: np.random.Generator, n: int, median: float, sigma: float, rng_range: LengthRange
) -> np.ndarray:
    x = rng.lognormal(mean=np.log(median), sigma=sigma, size=n)
    return np.clip(np.rint(x), rng_range.lo, rng_range.hi).astype(np.int64)


def _sharegpt_out(rng: np.random.Generator, n: int) -> np.ndarray:
    return _lognormal_clipped(rng, n, 250, 0.8, OUTPUT_RANGES["sharegpt"])


def _leval_out(rng: np.random.Generator, n: int) -> np.ndarray:
    return _lognormal_clipped(rng, n, 80, 0.9, OUTPUT_RANGES["l-eval"])


def _lveval_out(rng: np.random.Generator, n: int) -> np.ndarray:
    return _lognormal_clipped(rng, n, 20, 0.8, OUTPUT_RANGES["lv-eval"])


def sample_sharegpt(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    prompts = _lognormal_clipped(rng, n, 600, 0.9, PROMPT_RANGES["sharegpt"])
    return prompts, _sharegpt_out(rng, n)


def sample_leval(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    prompts = _lognormal_clipped(rng, n, 12_000, 1.0, PROMPT_RANGES["l-eval"])
    return prompts, _leval_out(rng, n)


_LVEVAL_LEVELS = np.array([21_000, 42_000, 84_000, 168_000, 336_000], dtype=np.float64)


def sample_lveval(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    centres = _LVEVAL_LEVELS[rng.integers(0, len(_LVEVAL_LEVELS), size=n)]
    x = centres * rng.lognormal(0.0, 0.15, size=n)
    r = PROMPT_RANGES["lv-eval"]
    prompts = np.clip(np.rint(x), r.lo, r.hi).astype(np.int64)
    return prompts, _lveval_out(rng, n)


def sample_mixed(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal parts of ShareGPT, L-Eval and LV-Eval (remainder to the first ones), shuffled."""
    parts = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    samples = [sample_sharegpt(rng, parts[0]), sample_leval(rng, parts[1]), sample_lveval(rng, parts[2])]
    prompts = np.concatenate([s[0] for s in samples])
    outputs = np.concatenate([s[1] for s in samples])
    order = rng.permutation(n)
    return prompts[order], outputs[order]


def zipf_sampler(alpha: float) -> LengthSampler:
    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        r = PROMPT_RANGES["zipf"]
        lengths = np.arange(r.lo, r.hi + 1, dtype=np.float64)
        weights = lengths ** (-alpha)
        prompts = rng.choice(lengths, size=n, p=weights / weights.sum()).astype(np.int64)
        outputs = np.where(
            prompts <= PROMPT_RANGES["sharegpt"].hi,
            _sharegpt_out(rng, n),
            np.where(prompts < PROMPT_RANGES["lv-eval"].lo, _leval_out(rng, n), _lveval_out(rng, n)),
        )
        return prompts, outputs

    return sample


LENGTH_SAMPLERS: dict[str, LengthSampler] = {
    "sharegpt": sample_sharegpt,
    "l-eval": sample_leval,
    "lv-eval": sample_lveval,
    "mixed": sample_mixed,
    "zipf-1.0": zipf_sampler(1.0),
    "zipf-1.2": zipf_sampler(1.2),
    "zipf-1.4": zipf_sampler(1.4),
}


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Arrival times (s) of a Poisson process of `rate` requests/s, first arrival at its gap."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def gamma_arrivals(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """Bursty arrivals: gamma-distributed gaps with mean 1/rate and coefficient of variation
    `cv` (cv = 1 is Poisson; cv > 1 clusters requests into bursts)."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be > 0")
    shape = 1.0 / (cv * cv)
    return np.cumsum(rng.gamma(shape, (1.0 / rate) / shape, size=n))


def generate(
    workload: str, num_requests: int, rate: float, seed: int = 0, burst_cv: float | None = None
) -> list[RequestSpec]:
    """A synthetic workload: `num_requests` requests of `workload` arriving at `rate` req/s.

    Lengths and arrivals come from separate generators seeded from `seed`, so the same
    lengths are offered at every rate of a sweep (the paper replays one dataset sample
    at several rates).
    """
    if workload not in LENGTH_SAMPLERS:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    prompts, outputs = sample_lengths(workload, num_requests, seed)
    arr_rng = np.random.default_rng([seed, 1])
    arrivals = (
        gamma_arrivals(arr_rng, num_requests, rate, burst_cv)
        if burst_cv
        else poisson_arrivals(arr_rng, num_requests, rate)
    )
    return [
        RequestSpec(f"r{i}", float(arrivals[i]), int(prompts[i]), int(outputs[i]))
        for i in range(num_requests)
    ]


def sample_lengths(workload: str, num_requests: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) of `num_requests` requests of `workload`."""
    return LENGTH_SAMPLERS[workload](np.random.default_rng([seed, 0]), num_requests)


def with_rate(requests: Sequence[RequestSpec], rate: float, seed: int = 0) -> list[RequestSpec]:
    """The same requests (lengths, order) re-timed as a Poisson process of `rate` req/s."""
    arrivals = poisson_arrivals(np.random.default_rng([seed, 1]), len(requests), rate)
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, arrivals)]


# --------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------


def write_trace(path: str | Path, requests: Iterable[RequestSpec]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(
                json.dumps(
                    {
                        "id": r.request_id,
                        "arrival_s": r.arrival_s,
                        "prompt_tokens": r.prompt_tokens,
                        "output_tokens": r.output_tokens,
                        **({"block_hashes": list(r.block_hashes)} if r.block_hashes else {}),
                    }
                )
                + "\n"
            )


def read_jsonl_requests(
    path: str | Path, limit: int | None, parse: Callable[[dict[str, Any], int], RequestSpec]
) -> list[RequestSpec]:
    """`parse(line's object, index)` for each non-blank line of a JSONL file (at most
    `limit` requests, in file order); returned sorted by arrival time. A bad line is a
    ValueError naming the file and line."""
    out: list[RequestSpec] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line), len(out)))
            except KeyError as e:
                raise ValueError(f"{path}:{lineno}: missing field {e}") from None
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    out.sort(key=lambda r: r.arrival_s)
    return out


def read_trace(path: str | Path, limit: int | None = None) -> list[RequestSpec]:
    """Read a trace in this project's JSONL format (`write_trace`)."""
    return read_jsonl_requests(path, limit, _trace_request)


def _trace_request(d: dict[str, Any], index: int) -> RequestSpec:
    return RequestSpec(
        str(d.get("id", f"r{index}")),
        float(d["arrival_s"]),
        int(d["prompt_tokens"]),
        int(d["output_tokens"]),
        tuple(int(h) for h in d.get("block_hashes", ())),
    )
