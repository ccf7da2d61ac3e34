"""The decision-time benchmark runs and reports what docs/bench-scheduler.md shows
(no timing assertions: timings are recorded in the doc, not tested)."""

import math

from esp_core.sched.bench import bench_one


def test_bench_one_reports_ratios_to_running_or_planned_decode_steps():
    r = bench_one(8, waiting=64, calls=30)
    assert r["calls"] == 30
    assert 0 < r["calls_with_decode"] <= r["calls"]
    assert r["p50_cpu_ms"] <= r["p99_cpu_ms"] <= r["max_cpu_ms"]
    assert r["median_ratio_to_decode_step"] <= r["max_ratio_to_decode_step"]
    assert 0.0 <= r["gc_share"] <= 1.0 and not math.isnan(r["p99_ratio_to_decode_step"])
