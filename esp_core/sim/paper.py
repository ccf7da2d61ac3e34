"""The LoongServe paper's measured max throughputs (req/s, 8x A800; docs/architecture.md §5),
keyed by our policy names, and a markdown table comparing sweep JSONs against them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

OOM = "OOM"
# policy -> dataset -> req/s (or OOM). `chunked-prefill` is LightLLM w/ SplitFuse TP8,
# `vllm` is vLLM TP8, `pd-disagg` is DistServe 4+4, `loongserve` is LoongServe TP2 x 4.
PAPER_MAX_THROUGHPUT: dict[str, dict[str, float | str]] = {
    "loongserve": {"sharegpt": 29.47, "l-eval": 2.416, "lv-eval": 0.201, "mixed": 0.553},
    "vllm": {"sharegpt": 6.35, "l-eval": 1.144, "lv-eval": 0.090, "mixed": 0.208},
    "chunked-prefill": {"sharegpt": 23.13, "l-eval": 1.231, "lv-eval": 0.082, "mixed": 0.144},
    "pd-disagg": {"sharegpt": 10.37, "l-eval": 0.415, "lv-eval": OOM, "mixed": OOM},
}
DATASETS = ("sharegpt", "l-eval", "lv-eval", "mixed")


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.3g}"


def load_sweeps(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        out[(d["policy"], d["workload"])] = d
    return out


def comparison_table(sweeps: dict[tuple[str, str], dict[str, Any]], policies: Iterable[str]) -> str:
    """Markdown: per dataset and policy, the paper's number, ours (paper's metric and the
    stable one) and ours / paper."""
    rows = [
        "| dataset | policy | paper | ours (mean per-token SLO) | ours (stable) | "
        "ours / paper | within 1.5x |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ds in DATASETS:
        for pol in policies:
            sw = sweeps.get((pol, ds))
            paper = PAPER_MAX_THROUGHPUT.get(pol, {}).get(ds)
            if sw is None:
                ours, stable = "not run", "not run"
            elif sw.get("oom"):
                ours = stable = OOM
            else:
                ours = sw["max_throughput_req_s"]
                stable = sw["max_throughput_stable_req_s"]
            main = ours if isinstance(ours, (int, float)) else stable
            if paper == OOM or main == OOM:
                ratio = "both OOM" if paper == main == OOM else "-"
                ok = "yes" if paper == main == OOM else "no"
            elif isinstance(paper, float) and isinstance(main, (int, float)):
                r = main / paper
                ratio, ok = f"{r:.2f}x", "yes" if 1 / 1.5 <= r <= 1.5 else "no"
            else:
                ratio, ok = "-", "-"
            if ours is None:
                ours = "not crossed"
            rows.append(f"| {ds} | {pol} | {_fmt(paper)} | {_fmt(ours)} | {_fmt(stable)} | {ratio} | {ok} |")
    return "\n".join(rows)


def esp_vs_loongserve(sweeps: dict[tuple[str, str], dict[str, Any]]) -> str:
    rows = [
        "| dataset | loongserve (stable) | esp (stable) | esp / loongserve | "
        "loongserve (mean per-token SLO) | esp (mean per-token SLO) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ds in DATASETS:
        a, b = sweeps.get(("loongserve", ds)), sweeps.get(("esp", ds))
        if a is None or b is None:  # show the side that ran

            def cell(sw, key):
                return "not run" if sw is None else _fmt(sw[key] or "not crossed")

            rows.append(
                f"| {ds} | {cell(a, 'max_throughput_stable_req_s')} | "
                f"{cell(b, 'max_throughput_stable_req_s')} | - | "
                f"{cell(a, 'max_throughput_req_s')} | {cell(b, 'max_throughput_req_s')} |"
            )
            continue
        sa, sb = a["max_throughput_stable_req_s"], b["max_throughput_stable_req_s"]
        r = f"{sb / sa:.2f}x" if sa and sb and not math.isnan(sa) else "-"
        rows.append(
            f"| {ds} | {_fmt(sa)} | {_fmt(sb)} | {r} | "
            f"{_fmt(a['max_throughput_req_s'] or 'not crossed')} | "
            f"{_fmt(b['max_throughput_req_s'] or 'not crossed')} |"
        )
    return "\n".join(rows)
