"""bench_overhead's goal ratios: each point against the reference measured right before
it, per repeat, never against another round's reference."""

from __future__ import annotations

from esp_serve.app.bench_overhead import goal_ratios, report


def _point(repeat: int, streams: int, itl_ms: float | None, server_cpu: float, ref: dict | None) -> dict:
    tiers = ("instances", "controller", "ingress", "serve_proxy", "haproxy", "ray_system")
    return {
        "repeat": repeat,
        "streams": streams,
        "itl_median_ms": itl_ms,
        "tokens_per_s": 100.0,
        "errors": [] if itl_ms is not None else ["boom"],
        "decode_steps": 10,
        "lookahead_steps": 9,
        "cpu_ms_per_token": {**{t: 0.0 for t in tiers}, "server": server_cpu},
        "reference": ref,
    }


def test_each_ratio_uses_its_own_rounds_reference() -> None:
    points = [
        _point(0, 1, 6.0, 9.0, {"step_ms": 5.0, "cpu_ms_per_token": 5.0}),
        _point(0, 32, 30.0, 1.5, {"step_ms": 25.0, "cpu_ms_per_token": 0.75}),
        _point(0, 128, 60.0, 1.2, None),  # no reference batch: no ratio
        _point(1, 1, 6.0, 9.0, {"step_ms": 7.5, "cpu_ms_per_token": 7.5}),
        _point(1, 32, 30.0, 1.5, {"step_ms": 25.0, "cpu_ms_per_token": 1.0}),
    ]
    ratios = goal_ratios(points)
    assert ratios["itl_1_stream"] == [1.2, 0.8]
    assert ratios["cpu_32_streams"] == [2.0, 1.5]
    text = report(points)
    assert "ITL at 1 stream / reference step at batch 1: 1.20x, 0.80x (median 1.00x)" in text
    assert "reference at batch 32: 2.00x, 1.50x (median 1.75x)" in text


def test_a_failed_point_or_a_skipped_reference_gives_no_ratio() -> None:
    points = [
        _point(0, 1, None, 0.0, {"step_ms": 5.0, "cpu_ms_per_token": 5.0}),
        _point(0, 32, 30.0, 1.5, None),
    ]
    assert goal_ratios(points) == {"itl_1_stream": [], "cpu_32_streams": []}
    text = report(points)
    assert "failed: ['boom']" in text
    assert "(median" not in text
