"""Latency-vs-rate plot of a sweep (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PANELS = (
    ("ttft_ms", "TTFT (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("per_token_latency_ms", "per-token latency (ms)"),
    ("e2el_ms", "e2e latency (ms)"),
)


def plot_sweep(points: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(
        (p for p in points if isinstance(p.get("rate"), (int, float)) and p["rate"] != float("inf")),
        key=lambda p: p["rate"],
    )
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 3.6))
    rates = [p["rate"] for p in pts]
    for ax, (key, label) in zip(axes, PANELS):
        for stat, style in (("mean", "o-"), ("p99", "s--")):
            ys = [p[key][stat] if p[key][stat] is not None else float("nan") for p in pts]
            ax.plot(rates, ys, style, label=stat)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax = axes[-1]
    ax.plot(rates, [p["request_throughput"] or 0.0 for p in pts], "o-", label="throughput")
    if any(p.get("goodput_req_s") is not None for p in pts):
        ax.plot(rates, [p.get("goodput_req_s") or 0.0 for p in pts], "s--", label="goodput")
    ax.plot(rates, rates, ":", color="grey", label="offered")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("completed (req/s)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
