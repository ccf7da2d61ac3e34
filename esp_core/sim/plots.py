"""Latency-vs-rate plots in the style of the paper's Figure 10 (matplotlib, Agg backend).

One row of three panels -- mean per-token, input and output latency against the request
rate -- with one line per sweep (policy) and the SLO as a dashed horizontal line; the
max-throughput crossing is marked on the per-token panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PANELS = (
    ("per_token_latency_ms", "per_token", "Per-token latency (ms)"),
    ("input_latency_ms", "input", "Input latency (ms/token)"),
    ("output_latency_ms", "output", "Output latency (ms/token)"),
)


def plot_sweeps(sweeps: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Draw sweep JSONs (as written by `sweep ... --json`) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for sw in sweeps:
        pts = sorted(sw["points"], key=lambda p: p["rate"])
        label = sw["policy"] + (" (OOM)" if sw.get("oom") else "")
        for ax, (key, _, _) in zip(axes, PANELS):
            xs = [p["rate"] for p in pts]
            ys = [p[key] for p in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        mt = sw.get("max_throughput_req_s")
        if mt:
            axes[0].axvline(mt, ls=":", lw=0.8, color=axes[0].lines[-1].get_color())
    if sweeps:
        slo = sweeps[0]["slo_ms"]
        for ax, (_key, slo_key, ylabel) in zip(axes, PANELS):
            ax.axhline(slo[slo_key], ls="--", color="grey", lw=1, label="SLO")
            ax.set_xlabel("Request rate (req/s)")
            ax.set_ylabel(ylabel)
            ymax = 3 * slo[slo_key]
            lo, hi = ax.get_ylim()
            ax.set_ylim(0, min(hi, ymax) if hi > 0 else ymax)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title or f"{sweeps[0]['workload']}: latency vs request rate")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
