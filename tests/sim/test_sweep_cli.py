"""Max-throughput interpolation and a ~50-request smoke sweep through the CLI."""

import json

import pytest

from esp_core.sim.cli import main
from esp_core.sim.sweep import crossing


def pts(*pairs):
    return [{"rate": r, "v": v} for r, v in pairs]


def test_crossing_interpolates_linearly():
    # 10 ms at rate 1, 30 ms at rate 2 -> 20 ms is crossed at 1.5
    assert crossing(pts((1, 10.0), (2, 30.0), (3, 90.0)), "v", 20.0) == pytest.approx(1.5)
    # unsorted input, crossing between the 2nd and 3rd points
    assert crossing(pts((3, 90.0), (1, 1.0), (2, 5.0)), "v", 50.0) == pytest.approx(2 + (50 - 5) / 85)
    assert crossing(pts((1, 1.0), (2, 2.0)), "v", 20.0) is None  # never crossed
    assert crossing(pts((1, 30.0), (2, 40.0)), "v", 20.0) is None  # crossed below range
    assert crossing(pts((1, 10.0), (2, float("nan"))), "v", 20.0) == 2


@pytest.mark.parametrize("policy", ["chunked-prefill", "esp"])
def test_cli_smoke_sweep_is_deterministic(policy, tmp_path, capsys):
    """A 50-request sweep at three rates; a second run with an SLO between the measured
    latencies reproduces the same curve and reports the interpolated crossing."""
    out1, out2, png = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "a.png"
    args = [
        "sweep",
        "--workload",
        "sharegpt",
        "--policy",
        policy,
        "--num-requests",
        "50",
        "--seed",
        "3",
        "--rates",
        "5,40,400",
        "--quick",
        "--quiet",
    ]
    assert main(args + ["--json", str(out1), "--plot", str(png)]) == 0
    a = json.loads(out1.read_text())
    assert png.stat().st_size > 10_000
    assert [p["rate"] for p in a["points"]] == [5, 40, 400]
    keys = {
        "rate",
        "per_token_latency_ms",
        "input_latency_ms",
        "output_latency_ms",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "goodput_req_s",
    }
    assert keys <= set(a["points"][0])
    assert all(p["completed"] == 50 for p in a["points"])
    lat = [p["per_token_latency_ms"] for p in a["points"]]
    assert lat[0] < lat[-1]  # latency grows with load
    assert a["max_throughput_req_s"] is None  # the paper's loose SLO is not crossed here

    limit = (lat[0] + lat[-1]) / 2
    assert main(args + ["--json", str(out2), "--slo", f"{limit},20,320"]) == 0
    b = json.loads(out2.read_text())
    same = keys - {"goodput_req_s"}  # goodput depends on the SLO
    for pa, pb in zip(a["points"], b["points"]):  # same seed: the same simulation
        assert {k: pa[k] for k in same} == {k: pb[k] for k in same}
    assert b["max_throughput_req_s"] == pytest.approx(crossing(b["points"], "per_token_latency_ms", limit))
    assert 5 < b["max_throughput_req_s"] < 400
    assert "max throughput" in capsys.readouterr().out


def test_cli_run_with_trace(tmp_path):
    trace, out = tmp_path / "t.jsonl", tmp_path / "r.json"
    assert (
        main(["trace", "--workload", "l-eval", "--rate", "0.5", "--num-requests", "8", "--out", str(trace)])
        == 0
    )
    assert (
        main(
            [
                "run",
                "--policy",
                "pd-disagg",
                "--workload",
                "l-eval",
                "--trace",
                str(trace),
                "--json",
                str(out),
                "--records",
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 8 and len(data["requests"]) == 8
    assert data["stats"]["migrations"] == 8


def test_duration_source_sends_rate_times_duration_requests():
    from esp_core.sim.sweep import duration_source
    from esp_core.sim.workloads import generate

    base = generate("sharegpt", 500, 1.0, seed=0)
    at = duration_source(base, duration_s=100, min_requests=20)
    assert len(at(0.05)) == 20  # floor
    assert len(at(2.5)) == 250
    assert len(at(50)) == 500  # ceiling: the base list
    # same lengths in the same order at every rate (common random numbers)
    assert [r.prompt_tokens for r in at(1.0)] == [r.prompt_tokens for r in base[:100]]


def test_stable_max_throughput_requires_draining():
    """A policy that keeps mean latency low by letting a backlog pile up is cut off where
    its drain ratio passes the limit, not where its latency crosses the SLO."""
    from esp_core.sim.metrics import SLO
    from esp_core.sim.sweep import DRAIN_LIMIT, SweepResult

    class Fixed(SweepResult):
        def points(self):
            return [
                {"rate": 1.0, "per_token_latency_ms": 1.0, "drain_ratio": 1.0},
                {"rate": 2.0, "per_token_latency_ms": 2.0, "drain_ratio": 2 * DRAIN_LIMIT},
                {"rate": 3.0, "per_token_latency_ms": 20.0, "drain_ratio": 4.0},
            ]

    res = Fixed("p", "w", SLO(10.0, 1e9, 1e9), 3, 0)
    assert res.max_throughput() == pytest.approx(2 + 8 / 18)  # latency alone
    # stability index: 0.8 at rate 1, 2.0 at rate 2 -> crosses 1.0 at 1 + 0.2 / 1.2
    assert res.max_throughput_stable() == pytest.approx(1 + 0.2 / 1.2)


def _sweep_args(*extra: str):
    from esp_core.sim.cli import apply_sweep_protocol, build_parser

    return apply_sweep_protocol(build_parser().parse_args(["sweep", *extra]))


def test_sweep_defaults_are_each_datasets_paper_protocol():
    a = _sweep_args("--workload", "sharegpt")
    assert (a.duration, a.max_requests, a.prescan_duration, a.num_requests, a.growth, a.refine) == (
        1000,
        20_000,
        100,
        200,
        1.12,
        1,
    )
    for workload in ("l-eval", "lv-eval", "mixed"):
        a = _sweep_args("--workload", workload)
        assert (a.duration, a.prescan_duration, a.num_requests, a.growth, a.refine) == (
            1000,
            None,
            50,
            1.6,
            2,
        )
    # --quick: a fixed count per rate, no windows; explicit values always win
    a = _sweep_args("--workload", "sharegpt", "--quick")
    assert (a.duration, a.prescan_duration, a.num_requests) == (None, None, 200)
    a = _sweep_args("--workload", "sharegpt", "--duration", "300", "--num-requests", "20")
    assert (a.duration, a.prescan_duration, a.num_requests, a.growth) == (300, 100, 20, 1.12)


def test_automatic_search_brackets_both_crossings(tmp_path):
    out = tmp_path / "s.json"
    assert (
        main(
            [
                "sweep",
                "--workload",
                "lv-eval",
                "--policy",
                "vllm",
                "--duration",
                "300",
                "--num-requests",
                "20",
                "--max-requests",
                "200",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    d = json.loads(out.read_text())
    slo = d["slo_ms"]["per_token"]
    mt, ms = d["max_throughput_req_s"], d["max_throughput_stable_req_s"]
    assert mt is not None and ms is not None and ms <= mt
    lat = {p["rate"]: p["per_token_latency_ms"] for p in d["points"]}
    assert (
        min(r for r, v in lat.items() if v > slo) > mt > max(r for r, v in lat.items() if v <= slo and r < mt)
    )
    # ~rate x duration requests per point (at least --num-requests)
    assert all(p["num_requests"] == max(20, -(-p["rate"] * 300 // 1)) for p in d["points"])


def test_paper_comparison_table():
    from esp_core.sim.paper import comparison_table, esp_vs_loongserve

    sweeps = {
        ("loongserve", "mixed"): {
            "oom": False,
            "max_throughput_req_s": 0.5,
            "max_throughput_stable_req_s": 0.4,
        },
        ("esp", "mixed"): {"oom": False, "max_throughput_req_s": None, "max_throughput_stable_req_s": 0.6},
        ("pd-disagg", "mixed"): {"oom": True},
        ("vllm", "mixed"): {"oom": False, "max_throughput_req_s": 0.5, "max_throughput_stable_req_s": 0.5},
    }
    table = comparison_table(sweeps, ["loongserve", "vllm", "pd-disagg"])
    assert "| mixed | loongserve | 0.553 | 0.5 | 0.4 | 0.90x | yes |" in table
    assert "| mixed | vllm | 0.208 | 0.5 | 0.5 | 2.40x | no |" in table
    assert "| mixed | pd-disagg | OOM | OOM | OOM | both OOM | yes |" in table
    assert "| mixed | 0.4 | 0.6 | 1.50x | 0.5 | not crossed |" in esp_vs_loongserve(sweeps)
    # only one side ran: its numbers still show
    only_loongserve = {
        ("loongserve", "l-eval"): {
            "oom": False,
            "max_throughput_req_s": 2.0,
            "max_throughput_stable_req_s": 1.9,
        }
    }
    assert "| l-eval | 1.9 | not run | - | 2 | not run |" in esp_vs_loongserve(only_loongserve)
