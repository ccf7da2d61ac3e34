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
        "tpot_median_ms": itl_ms,
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
    assert "time per token at 1 stream / reference step at batch 1: 1.20x, 0.80x (median 1.00x)" in text
    assert "reference at batch 32: 2.00x, 1.50x (median 1.75x)" in text


def test_the_one_stream_goal_is_per_token_not_per_chunk() -> None:
    # two tokens per chunk (a character of two byte-level tokens): chunks 120 ms apart,
    # a token every 60 ms; the reference steps in 60 ms
    point = _point(0, 1, 120.0, 60.0, {"step_ms": 60.0, "cpu_ms_per_token": 60.0})
    point["tpot_median_ms"] = 60.0
    assert goal_ratios([point])["itl_1_stream"] == [1.0]
    assert "| 120.0 (60.0) |" in report([point])


def test_a_failed_point_or_a_skipped_reference_gives_no_ratio() -> None:
    points = [
        _point(0, 1, None, 0.0, {"step_ms": 5.0, "cpu_ms_per_token": 5.0}),
        _point(0, 32, 30.0, 1.5, None),
    ]
    assert goal_ratios(points) == {"itl_1_stream": [], "cpu_32_streams": []}
    text = report(points)
    assert "failed: ['boom']" in text
    assert "(median" not in text


def test_the_reference_is_the_checkpoint_the_config_serves(tmp_path) -> None:
    import yaml

    from esp_serve.app.bench_overhead import served_path
    from esp_serve.app.config import load_config

    shipped = yaml.safe_load(open("serve_config.yaml"))["applications"][0]["args"]
    assert served_path("serve_config.yaml") == load_config(shipped).model.resolved_path
    assert served_path("serve_config.yaml").endswith(".gguf")  # the packaged SmolLM2
    doc = yaml.safe_load(open("serve_config.yaml"))
    doc["applications"][0]["args"]["model"]["path"] = "builtin"
    (tmp_path / "builtin.yaml").write_text(yaml.safe_dump(doc))
    assert served_path(str(tmp_path / "builtin.yaml")) == "builtin"
