"""Cost model: the shipped A800 profile reproduces the paper's data points, `fit`
recovers known coefficients, profiles round-trip, KV moves follow bytes and links."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esp_core.sched.cost_fit import fit, load_records, nnls_enumerate, unidentified_columns
from esp_core.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs
from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.model_shape import ModelShape

ROOT = Path(__file__).resolve().parents[2]
K = 1024


@pytest.fixture(scope="module")
def a800() -> CostModel:
    return CostModel.default_a800()


def test_model_shapes():
    m = ModelShape.llama2_7b()
    assert m.kv_bytes_per_token == 32 * 2 * 4096 * 2  # 0.5 MiB (facts file)
    assert 6.5e9 < m.num_params < 6.9e9
    assert 12e9 < m.dense_flops_per_token < 14e9  # ~14 GFLOP per token (2 x 6.7B parameters)
    tiny = ModelShape.builtin_tiny()
    assert (
        tiny.hidden_size,
        tiny.num_layers,
        tiny.num_heads,
        tiny.head_dim,
        tiny.num_kv_heads,
        tiny.intermediate_size,
        tiny.vocab_size,
    ) == (256, 4, 8, 32, 2, 768, 258)
    assert tiny.kv_bytes_per_token == 4 * 2 * 2 * 32 * 4
    # causal attention FLOPs: 4·d per pair per layer over L²/2 pairs
    assert m.attention_flops(100.0) == pytest.approx(4 * 4096 * 32 * 50)


ANCHORS = [
    # (name, value function, paper value)
    ("1K prefill on 1 GPU (s)", lambda cm: cm.prefill_time(1, K, K * K), 68.9e-3),
    ("decode at 1K, batch 1 (s)", lambda cm: cm.decode_time(1, K, 1), 13.0e-3),
    (
        "100K / 1K on 8 GPUs (SP8)",
        lambda cm: cm.prefill_time(8, 100_000, 1e10) / cm.prefill_time(8, 1000, 1e6),
        105.97,
    ),
    ("512x1K SP4xTP2 (s)", lambda cm: cm.prefill_time(4, 512 * K, 512 * K * K, tp=2), 5.27),
    ("512x1K TP8 (s)", lambda cm: cm.prefill_time(1, 512 * K, 512 * K * K, tp=8), 7.76),
    ("500K SP4xTP2 (s)", lambda cm: cm.prefill_time(4, 500_000, 500_000**2, tp=2), 53.6),
    ("500K TP8 (s)", lambda cm: cm.prefill_time(1, 500_000, 500_000**2, tp=8), 51.1),
    ("decode 512x1K SP4xTP2 (s)", lambda cm: cm.decode_time(128, 128 * K, 4, tp=2), 42e-3),
    ("decode 512x1K TP8 (s)", lambda cm: cm.decode_time(512, 512 * K, 1, tp=8), 39e-3),
]


@pytest.mark.parametrize("name,value,paper", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_shipped_a800_profile_reproduces_paper_within_10_percent(a800, name, value, paper):
    assert value(a800) == pytest.approx(paper, rel=0.10), name


@pytest.mark.parametrize("name,value,paper", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_analytical_preset_matches_shipped_profile(a800, name, value, paper):
    live = CostModel.analytical(ModelShape.llama2_7b(), HardwareSpec.a800())
    assert value(live) == pytest.approx(value(a800), rel=1e-9)


def test_sp4_beats_tp8_on_many_short_and_loses_on_one_long(a800):
    # the paper's qualitative finding (SP4xTP2 vs TP8)
    assert a800.prefill_time(4, 512 * K, 512 * K * K, tp=2) < a800.prefill_time(1, 512 * K, 512 * K * K, tp=8)
    assert a800.prefill_time(4, 500_000, 500_000**2, tp=2) > a800.prefill_time(1, 500_000, 500_000**2, tp=8)


def test_prefill_scales_with_dop_and_decode_is_bounded_by_busiest(a800):
    t1 = a800.prefill_time(1, 100_000, 1e10)
    t4 = a800.prefill_time(4, 100_000, 1e10)
    assert 3.0 < t1 / t4 < 4.0  # sublinear: ring overheads
    assert a800.decode_time(0, 0, 1) == 0.0
    # more KV on the busiest instance costs more; spreading over more instances pays
    # the per-layer exchange
    assert a800.decode_time(8, 200_000, 1) > a800.decode_time(8, 100_000, 1)
    one = a800.decode_time(8, 100_000, 1)
    two = a800.decode_time(8, 100_000, 2)
    assert two - one == pytest.approx(32 * a800.t_roundtrip(2, 8), rel=1e-9)
    assert a800.t_roundtrip(1) == 0.0


def test_kv_moves_follow_bytes_and_links():
    hw = HardwareSpec.a800()
    cm = CostModel.analytical(ModelShape.llama2_7b(), hw)
    n = 10_000
    nbytes = n * ModelShape.llama2_7b().kv_bytes_per_token
    intra = cm.kv_transfer_time(n)
    inter = cm.kv_transfer_time(n, cross_node=True)
    assert intra == pytest.approx(hw.message_latency_s(False) + nbytes / hw.link_bytes_per_s(False))
    assert inter == pytest.approx(hw.message_latency_s(True) + nbytes / hw.link_bytes_per_s(True))
    assert inter > 10 * intra
    assert cm.migration_time(n) > intra
    # a GQA model moves 4x fewer bytes per token than MHA of the same size
    gqa = CostModel.analytical(ModelShape("gqa", 32, 4096, 32, 8, 128, 11008, 32000), hw)
    assert gqa.kv_transfer_time(n) < 0.3 * intra
    assert cm.kv_transfer_time(0) == 0.0


def test_chunk_cross_time_grows_with_cache_and_shrinks_with_holders(a800):
    t1 = a800.chunk_cross_time(8192, 100_000, 1)
    t4 = a800.chunk_cross_time(8192, 100_000, 4)
    assert t1 > t4 > 0
    assert a800.chunk_cross_time(8192, 200_000, 4) > t4
    assert a800.chunk_cross_time(8192, 0, 4) == 0.0


def test_unprofiled_dop_is_scaled_from_nearest():
    cm = CostModel(
        ModelShape.llama2_7b(),
        HardwareSpec.a800(),
        prefill_table={(2, 1): PrefillCoeffs(0.01, 2e-5, 1e-10)},
        source="fitted",
    )
    co = cm.prefill_coeffs(4, 1)
    assert co.b == pytest.approx(1e-5) and co.c == pytest.approx(0.5e-10)
    assert co.a > 0.01  # two more ring steps per layer
    # unknown TP: analytical fallback
    assert cm.prefill_coeffs(2, 2) == cm._analytical_prefill(2, 2, False)


def test_vectorised_coefficients_match_scalar(a800):
    a, b, c = a800.prefill_coeff_arrays(8, tp=2)
    for p in range(1, 9):
        co = a800.prefill_coeffs(p, 2)
        assert (a[p], b[p], c[p]) == (co.a, co.b, co.c)
    assert math.isinf(a[0])


def test_profile_save_load_round_trip(tmp_path, a800):
    path = tmp_path / "p.json"
    a800.save(path)
    back = CostModel.from_profile(path)
    assert back.prefill_table == a800.prefill_table
    assert back.decode_table == a800.decode_table
    assert back.chunk_table == a800.chunk_table
    assert back.model == a800.model and back.hardware == a800.hardware
    for dop, tp, L in [(1, 1, 5000), (3, 2, 77_777), (8, 1, 400_000), (6, 2, 10_000)]:
        assert back.prefill_time(dop, L, L * L, tp) == a800.prefill_time(dop, L, L * L, tp)
    with pytest.raises(ValueError):
        CostModel.from_dict({"format": "nope"})


def test_nnls_enumerate_matches_unconstrained_when_positive():
    rng = np.random.default_rng(0)
    A = rng.random((20, 3))
    x = np.array([1.0, 2.0, 0.5])
    assert np.allclose(nnls_enumerate(A, A @ x), x)
    y = A @ np.array([1.0, -2.0, 0.5])
    sol = nnls_enumerate(A, y)
    assert np.all(sol >= 0)


def _synthetic_records(truth: CostModel, rng: np.random.Generator, noise: float):
    recs = []
    for dop, tp in [(1, 1), (2, 1), (4, 1), (2, 2)]:
        for _ in range(30):
            # log-uniform lengths, as a profiling grid would cover them
            lens = np.exp(rng.uniform(np.log(100), np.log(60_000), size=rng.integers(1, 8))).astype(np.int64)
            s, sq = int(lens.sum()), int((lens.astype(np.int64) ** 2).sum())
            t = truth.prefill_time(dop, s, sq, tp) * (1 + rng.normal(0, noise))
            recs.append(
                {
                    "hardware": "a800",
                    "model": "llama2-7b",
                    "kind": "prefill",
                    "dop": dop,
                    "tp": tp,
                    "lens": lens.tolist(),
                    "measured_ms": 1e3 * t,
                }
            )
    for _ in range(60):
        n = int(rng.integers(1, 5))
        R = int(rng.integers(1, 200))
        Kt = int(rng.integers(1000, 200_000))
        t = truth.decode_time(R, Kt, n) * (1 + rng.normal(0, noise))
        recs.append(
            {
                "hardware": "a800",
                "model": "llama2-7b",
                "kind": "decode",
                "dop": n,
                "tp": 1,
                "max_requests_per_master": R,
                "max_kv_tokens_per_instance": Kt,
                "measured_ms": 1e3 * t,
            }
        )
    return recs


def test_fit_recovers_known_coefficients():
    truth = CostModel(
        ModelShape.llama2_7b(),
        HardwareSpec.a800(),
        prefill_table={
            (1, 1): PrefillCoeffs(0.004, 6.0e-5, 2.0e-10),
            (2, 1): PrefillCoeffs(0.006, 3.1e-5, 1.1e-10),
            (4, 1): PrefillCoeffs(0.009, 1.6e-5, 0.55e-10),
            (2, 2): PrefillCoeffs(0.005, 1.6e-5, 0.6e-10),
        },
        decode_table={1: DecodeCoeffs(0.012, 1.5e-4, 2.5e-7, 1.2e-4, 1e-5, 2e-7)},
    )
    fitted, reports = fit(_synthetic_records(truth, np.random.default_rng(1), noise=0.0))
    for key, co in truth.prefill_table.items():
        got = fitted.prefill_table[key]
        assert got.a == pytest.approx(co.a, rel=1e-4)
        assert got.b == pytest.approx(co.b, rel=1e-4)
        assert got.c == pytest.approx(co.c, rel=1e-4)
    d, got = truth.decode_table[1], fitted.decode_table[1]
    for f in ("a", "b", "c", "rt_base", "rt_per_peer", "rt_per_request"):
        assert getattr(got, f) == pytest.approx(getattr(d, f), rel=1e-3), f
    assert all(r.max_rel_err < 1e-6 for r in reports)


def test_fit_with_noise_predicts_within_a_few_percent():
    truth = CostModel.analytical()
    recs = _synthetic_records(truth, np.random.default_rng(2), noise=0.03)
    fitted, reports = fit(recs)
    for dop, tp, L in [(1, 1, 20_000), (4, 1, 50_000), (2, 2, 5_000)]:
        assert fitted.prefill_time(dop, L, L * L, tp) == pytest.approx(
            truth.prefill_time(dop, L, L * L, tp), rel=0.05
        )
    assert fitted.decode_time(64, 50_000, 2) == pytest.approx(truth.decode_time(64, 50_000, 2), rel=0.05)
    assert all(r.mean_rel_err < 0.05 for r in reports)


def test_fit_keeps_analytical_exchange_when_records_never_span_instances():
    truth = CostModel.analytical()
    recs = [
        r
        for r in _synthetic_records(truth, np.random.default_rng(3), 0.0)
        if r["kind"] == "prefill" or r["dop"] == 1
    ]
    fitted, _ = fit(recs)
    assert fitted.decode_table[1].rt_base == pytest.approx(truth.decode_coeffs(1).rt_base)


def test_fit_keeps_analytical_exchange_when_every_record_spans_the_same_instances():
    # a server whose decode steps all span four instances (a long prompt spread by its
    # chunks): the exchange terms are constant multiples of the fixed part there, so the
    # records cannot price a narrower step; the fit keeps the analytical exchange and
    # fits the rest, instead of folding the exchange into the fixed part (which would
    # make a one-instance step look as dear as the four-instance one)
    truth = CostModel.analytical(ModelShape.builtin_tiny(), HardwareSpec.cpu())
    rng = np.random.default_rng(5)
    recs = []
    for _ in range(40):
        R, Kt = int(rng.integers(1, 8)), int(rng.integers(100, 4000))
        t = truth.decode_time(R, Kt, 4)
        recs.append(
            {
                "kind": "decode",
                "dop": 4,
                "tp": 1,
                "max_requests_per_master": R,
                "max_kv_tokens_per_instance": Kt,
                "measured_ms": 1e3 * t,
            }
        )
    fitted, reports = fit(recs, truth.model, truth.hardware)
    d, want = fitted.decode_table[1], truth.decode_coeffs(1)
    assert (d.rt_base, d.rt_per_peer, d.rt_per_request) == pytest.approx(
        (want.rt_base, want.rt_per_peer, want.rt_per_request)
    )
    assert fitted.decode_time(1, 8000, 1) == pytest.approx(truth.decode_time(1, 8000, 1), rel=1e-6)
    assert fitted.decode_time(1, 8000, 1) < fitted.decode_time(1, 2000, 4)
    assert reports[0].max_rel_err < 1e-6


def test_prefill_records_of_one_length_keep_the_analytical_length_terms():
    # a long prompt's first chunks, all 2,048 tokens at DoP 4: the records fix the time
    # at that length only; the fit keeps the analytical slope instead of a constant
    truth = CostModel.analytical(ModelShape.builtin_tiny(), HardwareSpec.cpu())
    t = 0.343  # measured, whatever the model says
    recs = [
        {
            "kind": "prefill",
            "dop": 4,
            "tp": 1,
            "sum_len": 2048.0,
            "sum_len_sq": 2048.0**2,
            "measured_ms": 1e3 * t,
        }
        for _ in range(5)
    ]
    fitted, _ = fit(recs, truth.model, truth.hardware)
    got, want = fitted.prefill_table[(4, 1)], truth.prefill_coeffs(4)
    assert (got.b, got.c) == pytest.approx((want.b, want.c))
    assert fitted.prefill_time(4, 2048, 2048**2) == pytest.approx(t)
    assert fitted.prefill_time(4, 100, 100**2) < t


def test_unidentified_columns_are_those_in_the_span_of_earlier_ones():
    F = np.array([[1.0, 2.0, 0.0, 4.0, 3.0], [1.0, 5.0, 0.0, 4.0, 6.0], [1.0, 7.0, 0.0, 4.0, 8.0]])
    # column 2 is never exercised, 3 is 4x column 0, 4 is column 0 + column 1
    assert unidentified_columns(F) == [2, 3, 4]
    assert unidentified_columns(F[:, [1, 0]]) == []
    # a context length that hardly varies (one long prompt's steps) is the fixed part
    kv = np.array([[1.0, 8001.0], [1.0, 8007.0], [1.0, 8015.0]])
    assert unidentified_columns(kv) == [1]
    assert unidentified_columns(kv * [1.0, 1.0] + [[0.0, 0.0], [0.0, 2000.0], [0.0, 4000.0]]) == []


def test_fit_cli_round_trip(tmp_path):
    truth = CostModel.analytical()
    recs = _synthetic_records(truth, np.random.default_rng(4), 0.0)
    rec_path = tmp_path / "prof.jsonl"
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert len(load_records(rec_path)) == len(recs)
    out = tmp_path / "fitted.json"
    proc = subprocess.run(
        [sys.executable, "-m", "esp_core.sched.cost_model", "fit", str(rec_path), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    cm = CostModel.from_profile(out)
    assert cm.source == "fitted"
    assert cm.prefill_time(2, 30_000, 9e8) == pytest.approx(truth.prefill_time(2, 30_000, 9e8), rel=1e-3)
