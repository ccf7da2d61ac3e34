"""Fit cost-model coefficients from profiling records (JSONL) and the `cost_model` CLI.

Record format: one JSON object per line. Common fields:

    {"hardware": "a800", "model": "llama2-7b", "kind": "prefill" | "decode" | "chunk",
     "dop": 4, "tp": 2, "measured_ms": 123.4}

plus, by kind:

* prefill: `sum_len`, `sum_len_sq` (or `lens`: the list of request lengths);
* decode: `max_requests_per_master`, `max_kv_tokens_per_instance` (`dop` is |D|);
  optional `batch_size`;
* chunk: `chunk_len`, `cached_len`, `num_holders`; `measured_ms` is the whole chunk
  (its own prefill on `dop` instances plus the cross-attention to the cached KV).

Fitting (the paper's method): per (dop, tp) for prefill and per tp for decode, weighted
least squares on *relative* error, weight t^0.1, coefficients constrained >= 0 (exact
NNLS by enumerating active sets: at most 6 unknowns). Terms the records cannot
identify (the exchange terms when every decode record ran on one instance, or all on
the same number of instances) keep their analytical values.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esp_core.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs
from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.model_shape import ModelShape

WEIGHT_EXPONENT = 0.1  # weight t^0.1 on relative errors, as LoongServe's profiler does
# a column whose records' values vary, beyond what the columns before it explain, by
# less than this fraction of their size keeps its analytical value (unidentified_columns)
IDENTIFY_TOL = 0.02
MIN_RECORDS = 3


@dataclass(frozen=True)
class FitReport:
    """Relative error of the fitted model on its own records, per group."""

    group: str
    num_records: int
    mean_rel_err: float
    max_rel_err: float


def load_records(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not JSON: {e}") from None
        out.append(normalise_record(rec))
    return out


def normalise_record(rec: dict[str, Any]) -> dict[str, Any]:
    rec = dict(rec)
    kind = rec.get("kind")
    if kind not in ("prefill", "decode", "chunk"):
        raise ValueError(f"record kind must be prefill|decode|chunk, got {kind!r}")
    rec.setdefault("dop", 1)
    rec.setdefault("tp", 1)
    if "measured_ms" not in rec or float(rec["measured_ms"]) <= 0:
        raise ValueError("record needs a positive measured_ms")
    if kind == "prefill" and "lens" in rec:
        lens = [int(x) for x in rec["lens"]]
        rec.setdefault("sum_len", sum(lens))
        rec.setdefault("sum_len_sq", sum(x * x for x in lens))
    return rec


def nnls_enumerate(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||A x - y|| subject to x >= 0, exactly, by trying every support set (small n)."""
    n = A.shape[1]
    best_x, best_r = np.zeros(n), float(np.sum(y * y))
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(n)
            x[cols] = sol
            r = float(np.sum((A @ x - y) ** 2))
            if r < best_r - 1e-15 * max(best_r, 1e-30):
                best_x, best_r = x, r
    return best_x


def weighted_relative_fit(
    features: np.ndarray, times: np.ndarray, fixed: dict[int, float] | None = None
) -> np.ndarray:
    """Coefficients x >= 0 minimising Σ t^0.1 · ((F x - t) / t)²; `fixed` columns keep
    given values (their contribution is subtracted before fitting the rest)."""
    fixed = fixed or {}
    free = [j for j in range(features.shape[1]) if j not in fixed]
    y = times.astype(float).copy()
    for j, v in fixed.items():
        y -= features[:, j] * v
    x = np.zeros(features.shape[1])
    for j, v in fixed.items():
        x[j] = v
    if free:
        scale = _row_scale(times)
        x[free] = nnls_enumerate(features[:, free] * scale[:, None], y * scale)
    return x


def _row_scale(times: np.ndarray) -> np.ndarray:
    """sqrt(weight) / t: squared relative errors weighted by t^0.1."""
    return np.sqrt(times**WEIGHT_EXPONENT) / times


def unidentified_columns(features: np.ndarray, times: np.ndarray | None = None) -> list[int]:
    """Columns (in order) that the records cannot tell apart from the identified columns
    before them: their part orthogonal to those columns' span is under
    `IDENTIFY_TOL` of their length (rows weighted as the fit weighs them, given
    `times`). A fit could trade such a column for the others at (almost) no cost to
    the error, so the noise would pick its value: never exercised, every record at one
    width (the exchange terms are then multiples of the fixed part), or a context
    length that hardly varies (the KV read cannot be told from the fixed part)."""
    rows = features if times is None else features * _row_scale(times)[:, None]
    basis: list[np.ndarray] = []  # orthonormal, spanning the identified columns
    out = []
    for j in range(rows.shape[1]):
        col = rows[:, j]
        length = float(np.linalg.norm(col))
        rest = col.copy()
        for q in basis:
            rest -= (q @ rest) * q
        if length > 0 and float(np.linalg.norm(rest)) > IDENTIFY_TOL * length:
            basis.append(rest / np.linalg.norm(rest))
        else:
            out.append(j)
    return out


def _rel_errors(pred: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    rel = np.abs(pred / times - 1.0)
    return float(rel.mean()), float(rel.max())


def fit(
    records: Sequence[dict[str, Any]], model: ModelShape | None = None, hardware: HardwareSpec | None = None
) -> tuple[CostModel, list[FitReport]]:
    """Fit a `CostModel` to profiling records; returns it with per-group fit errors."""
    records = [normalise_record(r) for r in records]
    if model is None:
        names = {r.get("model") for r in records if r.get("model")}
        model = ModelShape.preset(str(names.pop())) if len(names) == 1 else ModelShape.llama2_7b()
    if hardware is None:
        names = {r.get("hardware") for r in records if r.get("hardware")}
        hardware = HardwareSpec.preset(str(names.pop())) if len(names) == 1 else HardwareSpec.a800()
    reports: list[FitReport] = []
    analytical = CostModel.analytical(model, hardware)  # what unidentified terms keep
    fitted = CostModel(
        model=model,
        hardware=hardware,
        prefill_table=_fit_prefill(records, analytical, reports),
        decode_table=_fit_decode(records, analytical, reports),
        source="fitted",
    )
    # after prefill and decode: the chunk's own part is removed with the fitted model
    fitted.chunk_table = _fit_chunk_cross(records, fitted, reports)
    return fitted, reports


def _by(records: Sequence[dict[str, Any]], kind: str, *keys: str) -> list[tuple[Any, list[dict[str, Any]]]]:
    """Records of `kind` grouped by the values of `keys`, in key order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        if r["kind"] == kind:
            key = tuple(int(r[k]) for k in keys)
            groups.setdefault(key if len(key) > 1 else key[0], []).append(r)
    return sorted(groups.items())


def _fit_prefill(
    records: Sequence[dict[str, Any]], analytical: CostModel, reports: list[FitReport]
) -> dict[tuple[int, int], PrefillCoeffs]:
    """a + b ΣL + c ΣL², per (dop, tp); a term the records cannot identify (every
    record of one length: a long prompt's first chunks) keeps its analytical value."""
    table: dict[tuple[int, int], PrefillCoeffs] = {}
    for (dop, tp), recs in _by(records, "prefill", "dop", "tp"):
        if len(recs) < MIN_RECORDS:
            continue
        F = np.array([[1.0, r["sum_len"], r["sum_len_sq"]] for r in recs], dtype=float)
        t = np.array([r["measured_ms"] / 1e3 for r in recs])
        co = analytical.prefill_coeffs(dop, tp)
        fixed = {j: (co.a, co.b, co.c)[j] for j in unidentified_columns(F, t)}
        x = weighted_relative_fit(F, t, fixed)
        table[(dop, tp)] = PrefillCoeffs(*map(float, x))
        reports.append(FitReport(f"prefill dop={dop} tp={tp}", len(recs), *_rel_errors(F @ x, t)))
    return table


def _decode_features(r: dict[str, Any], layers: int) -> list[float]:
    n = int(r["dop"])
    R = float(r["max_requests_per_master"])
    multi = 1.0 if n > 1 else 0.0
    return [
        1.0,
        R,
        float(r["max_kv_tokens_per_instance"]),
        layers * multi,
        layers * max(n - 2, 0),
        layers * R * multi,
    ]


def _fit_decode(
    records: Sequence[dict[str, Any]], analytical: CostModel, reports: list[FitReport]
) -> dict[int, DecodeCoeffs]:
    """Busiest master's work + KV read + the exchange round trips, per tp."""
    table: dict[int, DecodeCoeffs] = {}
    layers = analytical.model.num_layers
    for tp, recs in _by(records, "decode", "tp"):
        if len(recs) < MIN_RECORDS:
            continue
        F = np.array([_decode_features(r, layers) for r in recs])
        t = np.array([r["measured_ms"] / 1e3 for r in recs])
        a = analytical.decode_coeffs(tp)
        analytic_vec = [a.a, a.b, a.c, a.rt_base, a.rt_per_peer, a.rt_per_request]
        # a column the records cannot tell apart from the columns before it keeps its
        # analytical value (unidentified_columns)
        fixed = {j: analytic_vec[j] for j in unidentified_columns(F, t)}
        x = weighted_relative_fit(F, t, fixed)
        table[tp] = DecodeCoeffs(*map(float, x))
        reports.append(FitReport(f"decode tp={tp}", len(recs), *_rel_errors(F @ x, t)))
    return table


def _fit_chunk_cross(
    records: Sequence[dict[str, Any]], fitted: CostModel, reports: list[FitReport]
) -> dict[int, float]:
    """A chunk's attention to its cached prefix, per tp: what the chunk took beyond the
    fitted model's own prefill and round trips."""
    table: dict[int, float] = {}
    layers = fitted.model.num_layers
    for tp, recs in _by(records, "chunk", "tp"):
        t = np.array([r["measured_ms"] / 1e3 for r in recs])
        own = np.array(
            [
                fitted.prefill_time(int(r["dop"]), r["chunk_len"], r["chunk_len"] ** 2, tp)
                + layers * fitted.t_roundtrip(int(r["num_holders"]) + 1, r["chunk_len"], tp)
                for r in recs
            ]
        )
        F = np.array(
            [[r["chunk_len"] * r["cached_len"] / max(int(r["num_holders"]), 1)] for r in recs], dtype=float
        )
        x = weighted_relative_fit(F, np.maximum(t - own, 1e-12))
        table[tp] = float(x[0])
        reports.append(FitReport(f"chunk tp={tp}", len(recs), *_rel_errors(own + F @ x, t)))
    return table


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def cli(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m esp_core.sched.cost_model", description="Fit, build or show cost-model profiles."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pf = sub.add_parser("fit", help="fit a profile from JSONL records")
    pf.add_argument("records")
    pf.add_argument("--out", required=True)
    pf.add_argument("--hardware", help="hardware preset (default: from the records)")
    pf.add_argument("--model", help="model preset (default: from the records)")
    pa = sub.add_parser("analytical", help="write the analytical profile of a preset pair")
    pa.add_argument("--hardware", default="a800")
    pa.add_argument("--model", default="llama2-7b")
    pa.add_argument("--dops", default="1,2,3,4,5,6,7,8")
    pa.add_argument("--tps", default="1,2,4,8")
    pa.add_argument("--notes", default="")
    pa.add_argument("--out", required=True)
    ps = sub.add_parser("show", help="print a profile's prefill/decode times on a grid")
    ps.add_argument("profile")
    args = p.parse_args(list(argv) if argv is not None else None)

    if args.cmd == "fit":
        cm, reports = fit(
            load_records(args.records),
            ModelShape.preset(args.model) if args.model else None,
            HardwareSpec.preset(args.hardware) if args.hardware else None,
        )
        cm.save(args.out)
        for r in reports:
            print(
                f"{r.group:24s} n={r.num_records:4d} mean rel err {100 * r.mean_rel_err:5.1f}% "
                f"max {100 * r.max_rel_err:5.1f}%"
            )
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "analytical":
        cm = CostModel.analytical(
            ModelShape.preset(args.model), HardwareSpec.preset(args.hardware), notes=args.notes
        )
        cm.save(args.out, dops=_parse_ints(args.dops), tps=_parse_ints(args.tps))
        print(f"wrote {args.out}")
        return 0
    cm = CostModel.from_profile(args.profile)
    print(f"{cm.source} profile: {cm.hardware.name} / {cm.model.name}")
    for tp in sorted({t for _, t in cm.prefill_table} or {1}):
        for dop in sorted({d for d, t in cm.prefill_table if t == tp} or {1}):
            cells = "  ".join(
                f"{L // 1000:>4d}K {cm.prefill_time(dop, L, L * L, tp):8.3f}s"
                for L in (1000, 10_000, 100_000, 500_000)
            )
            print(f"prefill dop={dop} tp={tp}: {cells}")
    for tp in sorted(cm.decode_table or [1]):
        cells = "  ".join(
            f"B={b:<3d} {1e3 * cm.decode_time(b, b * 1024, 1, tp):7.2f}ms" for b in (1, 32, 128)
        )
        print(f"decode  tp={tp} (1K ctx): {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
