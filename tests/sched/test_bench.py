"""The decision-time benchmark measures what docs/bench-scheduler.md says it measures
(no timing thresholds: timings are recorded in the doc, not tested)."""

import math

from esp_core.sched.bench import bench_one
from esp_core.sched.cost_model import CostModel


def test_bench_one_ratios_are_call_times_over_cost_model_decode_steps():
    r = bench_one(8, waiting=64, calls=30)
    assert r["calls"] == 30
    # 8 instances under a 64-deep backlog: after the cold round every call has a decode
    # step running or planned, so every call has a ratio
    assert r["calls_with_decode"] == 30
    assert r["stats"]["prefill_batches"] >= 8 and r["stats"]["decode_steps"] >= 1
    cost = CostModel.default_a800()
    shortest = min(cost.decode_time(1, 1, dop, 1) for dop in range(1, 9))  # ~12.5 ms
    # (more requests than the run ever has, a full instance's KV, one instance)
    longest = cost.decode_time(1000, 210_000, 1, 1)
    ms = 1e-3
    # ratio = call CPU time / a decode step of the scenario, so it is bounded by the
    # call times over the shortest and the longest step the cost model can give
    assert r["max_ratio_to_decode_step"] <= r["max_cpu_ms"] * ms / shortest * (1 + 1e-9)
    assert r["median_ratio_to_decode_step"] >= r["p50_cpu_ms"] * ms / longest * (1 - 1e-9)
    assert r["median_ratio_to_decode_step"] <= r["p99_ratio_to_decode_step"] <= r["max_ratio_to_decode_step"]
    assert 0.0 <= r["gc_share"] <= 1.0 and r["cold_cpu_ms"] > 0 and math.isfinite(r["mean_wall_ms"])


def test_bench_one_decisions_do_not_depend_on_the_machine():
    """Seeded workload, cost-model clock: two runs make the same decisions."""
    a, b = bench_one(8, waiting=32, calls=20), bench_one(8, waiting=32, calls=20)
    assert a["stats"] == b["stats"] and a["calls_with_decode"] == b["calls_with_decode"]


def test_largest_rounds_replays_the_calls_that_plan_the_most_prefill_requests():
    from esp_core.sched.bench import bench_largest_rounds

    r = bench_largest_rounds(8, rounds=3, repeats=2, waiting=64, calls=30)
    assert len(r["requests_per_round"]) == len(r["min_ms_per_round"]) == 3
    assert all(t > 0 for t in r["min_ms_per_round"])
    assert math.isclose(r["sum_min_ms"], sum(r["min_ms_per_round"]))
    # seeded and replayed: the same calls are chosen again
    assert (
        bench_largest_rounds(8, rounds=3, repeats=1, waiting=64, calls=30)["requests_per_round"]
        == (r["requests_per_round"])
    )


def test_set_overrides_the_timed_config(capsys):
    """`--set FIELD=VALUE` times that config: with at most 3 requests admitted per
    round, the replayed rounds are other ones, none over 3."""
    from esp_core.sched.bench import main

    args = ["--largest-rounds", "--instances", "8", "--calls", "12"]
    main(args)
    uncapped = capsys.readouterr().out
    main([*args, "--set", "max_prefill_requests=3"])
    capped = capsys.readouterr().out

    def requests(out: str) -> list[int]:
        return [int(x) for x in out.split("requests [")[1].split("]")[0].split(",")]

    assert requests(capped) != requests(uncapped)
    assert max(requests(capped)) == 3
