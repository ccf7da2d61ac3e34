"""Synthetic workloads stay in the paper's published ranges and have the stated shapes."""

import numpy as np
import pytest

from esp_core.sim.workloads import (
    OUTPUT_RANGES,
    PROMPT_RANGES,
    WORKLOADS,
    RequestSpec,
    gamma_arrivals,
    generate,
    poisson_arrivals,
    read_trace,
    sample_lengths,
    with_rate,
    write_trace,
)


@pytest.mark.parametrize("name", ["sharegpt", "l-eval", "lv-eval"])
def test_datasets_within_published_ranges(name):
    prompts, outputs = sample_lengths(name, 4000, seed=3)
    r, o = PROMPT_RANGES[name], OUTPUT_RANGES[name]
    assert prompts.min() >= r.lo and prompts.max() <= r.hi
    assert outputs.min() >= o.lo and outputs.max() <= o.hi
    # the distribution actually spans the range (not a point mass at the clip)
    assert np.percentile(prompts, 99) > 3 * np.percentile(prompts, 1)


def test_sharegpt_outputs_below_1000_and_lveval_levels():
    _, out = sample_lengths("sharegpt", 4000, seed=1)
    assert out.max() < 1000
    prompts, _ = sample_lengths("lv-eval", 5000, seed=1)
    # five length levels with equal counts: each doubling band holds ~1/5
    bands = np.histogram(np.log2(prompts / 21_000), bins=[-1, 0.5, 1.5, 2.5, 3.5, 5])[0]
    assert np.all(np.abs(bands / 5000 - 0.2) < 0.03), bands


def test_mixed_is_equal_thirds():
    prompts, _ = sample_lengths("mixed", 3000, seed=2)
    short = np.sum(prompts <= PROMPT_RANGES["sharegpt"].hi)
    very_long = np.sum(prompts > PROMPT_RANGES["l-eval"].hi)
    assert abs(short - 1000) <= 5  # L-Eval's minimum 2.7K is above ShareGPT's max
    assert very_long < 1000  # LV-Eval and L-Eval overlap, so only a bound here


def test_zipf_range_and_skew():
    means = []
    for alpha in (1.0, 1.2, 1.4):
        prompts, _ = sample_lengths(f"zipf-{alpha}", 4000, seed=5)
        assert prompts.min() >= 10 and prompts.max() < 200_000
        means.append(prompts.mean())
        # P(x) ~ x^-alpha: the share of prompts <= 100 tokens grows with alpha
    assert means[0] > means[1] > means[2]


def test_poisson_and_gamma_rates():
    rng = np.random.default_rng(0)
    t = poisson_arrivals(rng, 20_000, rate=4.0)
    gaps = np.diff(t)
    assert abs(1 / gaps.mean() - 4.0) / 4.0 < 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05
    g = np.diff(gamma_arrivals(rng, 20_000, rate=4.0, cv=3.0))
    assert abs(1 / g.mean() - 4.0) / 4.0 < 0.08
    assert abs(g.std() / g.mean() - 3.0) < 0.3


def test_generate_is_deterministic_and_rate_only_moves_arrivals():
    a = generate("mixed", 50, 1.0, seed=7)
    b = generate("mixed", 50, 1.0, seed=7)
    c = generate("mixed", 50, 3.0, seed=7)
    assert a == b
    assert [(r.prompt_tokens, r.output_tokens) for r in a] == [(r.prompt_tokens, r.output_tokens) for r in c]
    assert c[-1].arrival_s < a[-1].arrival_s
    assert with_rate(a, 3.0, seed=7) == c
    assert generate("mixed", 50, 1.0, seed=8) != a
    assert set(WORKLOADS) >= {"sharegpt", "l-eval", "lv-eval", "mixed", "zipf-1.0"}


def test_trace_round_trip(tmp_path):
    reqs = [RequestSpec("b", 0.5, 100, 7), RequestSpec("a", 0.25, 9, 1)]
    path = tmp_path / "t.jsonl"
    write_trace(path, reqs)
    assert read_trace(path) == sorted(reqs, key=lambda r: r.arrival_s)
    path.write_text('{"arrival_s": 1, "prompt_tokens": 5}\n')
    with pytest.raises(ValueError, match="output_tokens"):
        read_trace(path)


def test_trace_limit_and_bad_values_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(path, [RequestSpec(f"r{i}", 3.0 - i, 10 + i, 2) for i in range(3)])
    # the limit counts lines in file order, then the result is sorted by arrival
    assert [r.request_id for r in read_trace(path, limit=2)] == ["r1", "r0"]
    path.write_text(
        '{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1}\n'
        '{"arrival_s": -1, "prompt_tokens": 5, "output_tokens": 1}\n'
    )
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*arrival_s"):
        read_trace(path)
    path.write_text('{"arrival_s": 0, "prompt_tokens": 0, "output_tokens": 1}\n')
    with pytest.raises(ValueError, match=r":1: .*lengths must be >= 1"):
        read_trace(path)


def test_request_spec_rejects_impossible_requests():
    with pytest.raises(ValueError):
        RequestSpec("x", float("nan"), 5, 1)
    with pytest.raises(ValueError):
        RequestSpec("x", 0.0, 5, 0)


def test_serving_benchmark_shares_the_simulators_request_spec(tmp_path):
    from esp_serve.app.bench import workload as bench_workload

    assert bench_workload.RequestSpec is RequestSpec
    path = tmp_path / "t.jsonl"
    bench_workload.write_trace(path, [RequestSpec("a", 0.0, 4, 1)])
    assert read_trace(path) == bench_workload.read_trace(path) == [RequestSpec("a", 0.0, 4, 1)]
