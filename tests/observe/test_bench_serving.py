"""The benchmark client against a real HTTP server with known delays: the requests it
sends (vLLM conventions, exact prompt lengths), the latencies it measures, goodput,
sweeps with JSON and plot, traces, failures and timeouts, the loopback guard."""

from __future__ import annotations

import asyncio
import json

import pytest

from esp_serve.app import bench_serving
from esp_serve.app.bench import workload as wl
from esp_serve.app.bench.client import RequestResult
from esp_serve.app.bench.stats import parse_slos, summarize
from tests.observe.fake_openai_server import MODEL, Behaviour, ServerThread

TTFT, ITL = 0.2, 0.05
# lower bounds are exact (the server sleeps at least that long); upper bounds leave
# room for a loaded 2-core machine
SLACK = 0.25
# one scheduling stall of the test process (client and server share it and its GIL) may
# delay a single send on a busy CI machine: one CI run saw a send 0.68 s late
STALL = 1.0


def _run(base_url, *extra):
    args = bench_serving.build_parser().parse_args(["--base-url", base_url, "--quiet", *extra])
    return asyncio.run(bench_serving.run(args))


@pytest.fixture()
def server():
    b = Behaviour(ttft_s=TTFT, itl_s=ITL)
    with ServerThread(b) as url:
        yield url, b


def test_measures_ttft_itl_tpot_e2e_and_sends_vllm_style_requests(server):
    url, b = server
    out = _run(
        url,
        "--num-requests",
        "6",
        "--prompt-len",
        "10:40",
        "--output-len",
        "3:6",
        "--rate",
        "20",
        "--save-requests",
        "--goodput",
        "ttft:5000",
        "e2el:10000",
    )
    (point,) = out["points"]
    assert out["model"] == MODEL and point["rate"] == 20.0
    assert point["completed"] == 6 and point["failed"] == 0
    specs = wl.synthetic(6, (10, 40), (3, 6), seed=0)
    # exact prompt lengths (token ids) and max_tokens = output length, ignore_eos, stream
    assert sorted((len(body["prompt"]), body["max_tokens"]) for body in b.received) == sorted(
        (s.prompt_tokens, s.output_tokens) for s in specs
    )
    for body in b.received:
        assert all(isinstance(t, int) for t in body["prompt"])
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["model"] == MODEL and body["stream_options"] == {"include_usage": True}
    assert len({tuple(body["prompt"]) for body in b.received}) == 6  # no two prompts alike
    recs = {r["request_id"]: r for r in out["requests"][0]["requests"]}
    for spec in specs:
        r = recs[spec.request_id]
        assert r["ok"] and r["output_tokens"] == spec.output_tokens
        assert r["prompt_tokens"] == spec.prompt_tokens
        # Lower bounds are exact: the server sleeps at least that long before sending.
        # A single gap has none (a chunk read late makes the next gap short), so gaps get
        # an upper bound each and a bound on their median below.
        want_e2e = TTFT + (spec.output_tokens - 1) * ITL
        assert TTFT <= r["ttft_s"] < TTFT + SLACK
        assert len(r["itl_s"]) == spec.output_tokens - 1
        assert all(0 <= g < ITL + SLACK for g in r["itl_s"])
        last_token = r["ttft_s"] + sum(r["itl_s"])  # the last token's arrival
        assert want_e2e <= last_token <= r["e2e_s"] < want_e2e + 2 * SLACK
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (spec.output_tokens - 1))
        assert r["tpot_s"] < ITL + SLACK
    gaps = sorted(g for r in recs.values() for g in r["itl_s"])
    assert ITL * 0.8 <= gaps[len(gaps) // 2] < ITL + SLACK
    assert TTFT * 1e3 <= point["ttft_ms"]["mean"] < (TTFT + SLACK) * 1e3
    assert point["itl_ms"]["p50"] == pytest.approx(1e3 * gaps[len(gaps) // 2], rel=0.2)
    assert point["output_tokens_short"] == 0
    assert point["total_output_tokens"] == sum(s.output_tokens for s in specs)
    mean_input = sum(1e3 * recs[s.request_id]["ttft_s"] / s.prompt_tokens for s in specs) / 6
    assert point["input_latency_ms"]["mean"] == pytest.approx(mean_input)
    assert point["slo_attainment"] == 1.0 and point["good_requests"] == 6
    assert point["goodput_req_s"] == pytest.approx(6 / point["duration_s"])


def test_poisson_sends_follow_the_planned_arrivals(server):
    url, b = server
    out = _run(
        url,
        "--num-requests",
        "8",
        "--prompt-len",
        "8:8",
        "--output-len",
        "1:1",
        "--rate",
        "10",
        "--save-requests",
    )
    recs = out["requests"][0]["requests"]
    planned = [s.arrival_s for s in wl.with_rate(wl.synthetic(8, (8, 8), (1, 1), 0), 10, 0)]
    assert [r["arrival_s"] for r in recs] == planned
    lags = sorted(r["send_s"] - r["arrival_s"] for r in recs)
    assert lags[0] >= 0  # never early
    assert lags[len(lags) // 2] < SLACK and lags[-1] < STALL  # on time but for a stall
    gaps = [y - x for x, y in zip(b.arrivals, b.arrivals[1:])]
    planned_gaps = [y - x for x, y in zip(planned, planned[1:])]
    errors = sorted(abs(g - p) for g, p in zip(gaps, planned_gaps))
    assert errors[len(errors) // 2] < SLACK and errors[-1] < STALL


@pytest.mark.parametrize("bos", [False, True])
def test_text_prompts_are_calibrated_with_tokenize(bos):
    b = Behaviour(ttft_s=0.01, itl_s=0.01, bos=bos)
    with ServerThread(b) as url:
        out = _run(
            url,
            "--num-requests",
            "3",
            "--prompt-len",
            "5:30",
            "--output-len",
            "2:2",
            "--prompt-mode",
            "text",
            "--save-requests",
        )
    assert out["points"][0]["completed"] == 3 and out["points"][0]["rate"] == "inf"
    wanted = sorted(s.prompt_tokens for s in wl.synthetic(3, (5, 30), (2, 2), 0))
    # the server sees the wanted count, BOS included when it adds one
    assert sorted(len(body["prompt"].encode()) + bos for body in b.received) == wanted
    assert sorted(r["prompt_tokens"] for r in out["requests"][0]["requests"]) == wanted
    assert all(isinstance(body["prompt"], str) for body in b.received)


def test_sweep_writes_json_and_plot_through_the_cli(server, tmp_path):
    url, _ = server
    trace = tmp_path / "trace.jsonl"
    wl.write_trace(trace, [wl.RequestSpec(f"t{i}", 0.05 * i, 6 + i, 2) for i in range(4)])
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    rc = bench_serving.main(
        [
            "--base-url",
            url,
            "--trace",
            str(trace),
            "--rates",
            "5,40",
            "--goodput",
            "ttft:10",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--quiet",
        ]
    )
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert [p["rate"] for p in doc["points"]] == [5.0, 40.0]
    assert doc["workload"]["num_requests"] == 4
    for p in doc["points"]:
        assert p["completed"] == 4
        assert p["good_requests"] == 0 and p["goodput_req_s"] == 0  # TTFT >= 200 ms > 10 ms
        assert set(p["ttft_ms"]) >= {"mean", "p50", "p90", "p99", "std", "min", "max"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_arrivals_are_used_as_is_without_a_rate(server, tmp_path):
    url, _ = server
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"arrival_s": 0.3, "prompt_tokens": 9, "output_tokens": 1}\n\n'
        '{"arrival_s": 0.0, "prompt_tokens": 7, "output_tokens": 2, "id": "x"}\n'
    )
    out = _run(url, "--trace", str(trace), "--save-requests")
    recs = out["requests"][0]["requests"]
    assert [(r["request_id"], r["arrival_s"]) for r in recs] == [("x", 0.0), ("r0", 0.3)]
    assert recs[1]["send_s"] >= 0.3 and out["points"][0]["rate"] is None


def test_failures_and_timeouts_are_recorded_not_fatal(tmp_path):
    b = Behaviour(ttft_s=0.05, itl_s=0.01, fail_prompt_lens={11}, stall_prompt_lens={12})
    trace = tmp_path / "trace.jsonl"
    wl.write_trace(trace, [wl.RequestSpec(f"r{n}", 0.0, n, 3) for n in (10, 11, 12)])
    with ServerThread(b) as url:
        out = _run(url, "--trace", str(trace), "--request-timeout", "1.5", "--save-requests")
        rc = bench_serving.main(
            [
                "--base-url",
                url,
                "--trace",
                str(trace),
                "--quiet",
                "--request-timeout",
                "1",
                "--json",
                str(tmp_path / "o.json"),
            ]
        )
    point = out["points"][0]
    assert (point["completed"], point["failed"]) == (1, 2)
    recs = {r["request_id"]: r for r in out["requests"][0]["requests"]}
    assert recs["r10"]["ok"]
    assert not recs["r11"]["ok"] and recs["r11"]["status"] == 500
    assert "HTTP 500" in recs["r11"]["error"]
    assert not recs["r12"]["ok"] and "timeout" in recs["r12"]["error"]
    assert rc == 1  # some requests failed


def test_only_loopback_targets_are_accepted():
    for bad in ("http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1", "http://8.8.8.8"):
        with pytest.raises(ValueError):
            bench_serving.check_loopback(bad)
    assert bench_serving.check_loopback("http://localhost:8000/") == "http://localhost:8000"
    assert bench_serving.check_loopback("http://127.0.0.2:1") == "http://127.0.0.2:1"
    assert bench_serving.check_loopback("http://[::1]:8000") == "http://[::1]:8000"
    assert bench_serving.main(["--base-url", "http://192.0.2.1:8000", "--quiet"]) == 2


def test_bounds_and_argument_errors():
    with pytest.raises(ValueError):
        bench_serving.load_requests(
            bench_serving.build_parser().parse_args(["--num-requests", str(wl.MAX_REQUESTS + 1)])
        )
    for bad in (["ttft"], ["ttft:0"], ["speed:3"]):
        with pytest.raises(ValueError):
            parse_slos(bad)
    with pytest.raises(ValueError):
        bench_serving.parse_rates("1,-2")
    assert bench_serving.parse_rates("0.5,inf") == [0.5, float("inf")]


def test_workload_generators_are_seeded_and_poisson():
    a = wl.synthetic(2000, (1, 100), (1, 10), seed=3)
    assert a == wl.synthetic(2000, (1, 100), (1, 10), seed=3)
    assert a != wl.synthetic(2000, (1, 100), (1, 10), seed=4)
    assert {r.prompt_tokens for r in a} <= set(range(1, 101))
    timed = wl.with_rate(a, rate=4.0, seed=0)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(timed, timed[1:])]
    assert all(g >= 0 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert 0.23 < mean < 0.27  # 1/rate = 0.25; seeded, so deterministic
    assert wl.poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_simulator_workloads_match_the_benchmark_workloads():
    from esp_core.sim import workloads as sim

    reqs = wl.dataset_workload("sharegpt", 20, seed=1)
    prompts, outputs = sim.sample_lengths("sharegpt", 20, 1)
    assert [r.prompt_tokens for r in reqs] == [int(p) for p in prompts]
    assert [r.output_tokens for r in reqs] == [int(o) for o in outputs]


def test_summary_of_hand_made_results():
    def ok(rid, ttft, e2e, out, itl, prompt=100):
        return RequestResult(
            rid, prompt, out, 0.0, send_s=0.0, ok=True, ttft_s=ttft, e2e_s=e2e, itl_s=itl, output_tokens=out
        )

    results = [
        ok("a", 0.1, 0.5, 5, [0.1] * 4),
        ok("b", 0.3, 1.0, 8, [0.1] * 7),
        RequestResult("c", 100, 4, 0.0, send_s=0.2, ok=False, error="HTTP 500: x"),
    ]
    s = summarize(results, {"ttft": 200.0, "tpot": 150.0}, rate=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"HTTP 500": 1})
    assert s["duration_s"] == pytest.approx(1.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((400 / 4 + 700 / 7) / 2)
    assert s["per_token_latency_ms"]["mean"] == pytest.approx((500 / 105 + 1000 / 108) / 2)
    assert s["input_latency_ms"]["mean"] == pytest.approx((1.0 + 3.0) / 2)
    assert s["good_requests"] == 1 and s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["goodput_req_s"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(13.0)


def test_api_key_is_sent_as_bearer_from_the_environment(server, monkeypatch):
    url, b = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    out = _run(url, "--num-requests", "2", "--prompt-len", "4:4", "--output-len", "1:1")
    assert out["points"][0]["completed"] == 2
    assert len(b.auth) == 3 and set(b.auth) == {"Bearer sk-test-123"}  # models + 2 requests
    assert "api_key" not in out["config"] and "sk-test" not in json.dumps(out)
