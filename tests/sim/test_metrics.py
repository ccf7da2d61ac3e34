"""Metrics on hand-computed cases."""

import math

import pytest

from esp_core.sim.metrics import SLO, SLO_PRESETS, request_latency, summarize
from esp_core.sim.simulator import RequestRecord


def rec(rid, arrival, prompt, out, first, finish, reason="length", rejected=None):
    r = RequestRecord(rid, arrival, prompt, out, first, finish, out if reason else 0, reason, rejected)
    return r


def test_request_latency_definitions():
    # arrives at 1 s, first token at 1.5 s, 11 tokens out, done at 3.5 s; prompt 100
    lat = request_latency(rec("a", 1.0, 100, 11, 1.5, 3.5))
    assert lat.per_token_ms == pytest.approx(2500 / 111)
    assert lat.input_ms == pytest.approx(500 / 100)
    assert lat.output_ms == pytest.approx(2000 / 10)
    assert lat.ttft_s == pytest.approx(0.5)
    one = request_latency(rec("b", 0.0, 10, 1, 0.2, 0.2))
    assert one.output_ms == 0.0 and one.input_ms == pytest.approx(20.0)


def test_summary_means_percentiles_attainment_goodput():
    records = [
        rec("a", 0.0, 100, 11, 0.5, 2.5),  # per-token 22.5, input 5, output 200
        rec("b", 1.0, 100, 11, 3.0, 5.0),  # per-token 36.0, input 20, output 200
        rec("c", 2.0, 50, 1, 2.1, 2.1),  # per-token ~1.96, input 2, output 0
        rec("d", 4.0, 10**6, 5, None, None, reason="abort", rejected="too long"),
    ]
    slo = SLO(per_token_ms=30.0, input_ms=10.0, output_ms=250.0)
    s = summarize(records, slo)
    assert (s.num_requests, s.completed, s.rejected, s.unfinished) == (4, 3, 1, 0)
    assert s.per_token_ms.mean == pytest.approx((2500 / 111 + 4000 / 111 + 100 / 51) / 3)
    assert s.input_ms.mean == pytest.approx((5 + 20 + 2) / 3)
    assert s.ttft_s.p50 == pytest.approx(0.5)
    assert s.tpot_ms.p99 == pytest.approx(200.0)
    # a and c meet every SLO; b misses input; d was rejected (a miss)
    assert s.slo_attainment == pytest.approx(2 / 4)
    assert s.offered_rate == pytest.approx(4 / 4.0)  # n / last arrival
    assert s.goodput_req_s == pytest.approx(0.5)
    assert s.throughput_req_s == pytest.approx(3 / 5.0)
    # arrival window [0, 4], warm-up 20% -> [0.8, 4]: a (2.5) and c (2.1) finish inside
    assert s.sustained_req_s == pytest.approx(2 / 3.2)


def test_empty_and_presets():
    s = summarize([], SLO(1, 1, 1))
    assert s.completed == 0 and math.isnan(s.per_token_ms.mean)
    assert SLO_PRESETS["sharegpt"] == SLO(92, 20, 320)
    assert SLO_PRESETS["l-eval"] == SLO(3.5, 1.8, 320)
    assert SLO_PRESETS["lv-eval"] == SLO(2.5, 2.5, 365)
    assert SLO_PRESETS["mixed"] == SLO(70, 90, 360)
