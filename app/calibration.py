"""The ESP group's cost model: built at start, recalibrated online from measured batches.

`make_cost_model(section, arch)` returns the model the scheduler starts with: a fitted
profile when `scheduler.cost_profile` names one (a path, or a name in esp_core/profiles),
else the analytical model from the served model's shape (read from instance 0) and the
`scheduler.hardware` preset.

`Calibrator` turns every completed batch into a profiling record (the same JSONL schema
as `esp_core.sched.cost_fit`: kind, dop, sum_len / sum_len_sq or decode features,
measured_ms), keeps the model's prediction next to it (the error ratio is what
`esp_cost_model_error_ratio` reports), and refits with `cost_fit.fit` every
`calibration_interval_s` once it has enough records. The refit model replaces the
scheduler's `cost` attribute in place (the scheduler reads it on every decision), so no
offline profiling run is needed; `save_profile` writes it for the next start.

Pure Python (no Ray, no torch): unit-tested alone.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esp_core.sched.cost_fit import FitReport, fit
from esp_core.sched.cost_model import CostModel
from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.model_shape import ModelShape
from esp_core.sched.plan import BatchResult, DecodeBatch, PrefillBatch

log = logging.getLogger("ray.serve")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_shape(arch: Mapping[str, Any], dtype: str, name: str) -> ModelShape:
    """The cost model's view of the served model (from `ElasticInstance.model_info`)."""
    return ModelShape(
        name=name,
        num_layers=int(arch["num_layers"]),
        hidden_size=int(arch["hidden_size"]),
        num_heads=int(arch["num_heads"]),
        num_kv_heads=int(arch["num_kv_heads"]),
        head_dim=int(arch["head_dim"]),
        intermediate_size=int(arch["intermediate_size"]),
        vocab_size=int(arch["vocab_size"]),
        dtype_bytes=DTYPE_BYTES[dtype],
    )


def make_cost_model(cost_profile: str | None, hardware: str, shape: ModelShape) -> CostModel:
    if cost_profile:
        model = CostModel.from_profile(cost_profile)
        log.info("cost model: fitted profile %s (%s)", cost_profile, model.source)
        return model
    return CostModel.analytical(
        shape, HardwareSpec.preset(hardware), notes="analytical default of the live server"
    )


def batch_record(batch: PrefillBatch | DecodeBatch, tp: int = 1) -> dict[str, Any] | None:
    """The cost_fit record of a batch on instances of `tp` TP ranks, without its measured
    time (None when the batch has no record form: chunks attending to cached KV and the
    decode step of a KV move are not refitted online)."""
    if isinstance(batch, PrefillBatch):
        if any(it.cached_holders for it in batch.items):
            return None
        lens = [len(it.tokens) for it in batch.items]
        return {
            "kind": "prefill",
            "dop": len(batch.instances),
            "tp": tp,
            "sum_len": float(sum(lens)),
            "sum_len_sq": float(sum(n * n for n in lens)),
        }
    roles = {i for it in batch.items for i in (it.master, it.new_kv_instance, *it.holders)}
    if not roles.issuperset(batch.instances):
        # the step of a KV move: the instances the KV leaves take part only to be busy
        # until their sends end, so neither its width nor its time is a step's
        return None
    masters: dict[int, int] = {}
    kv: dict[int, float] = {}
    for it in batch.items:
        masters[it.master] = masters.get(it.master, 0) + 1
        # context tokens spread over the holders (the plan has no per-holder counts)
        share = (it.position + 1) / max(len(it.holders), 1)
        for h in it.holders:
            kv[h] = kv.get(h, 0.0) + share
    return {
        "kind": "decode",
        "dop": len(batch.instances),
        "tp": tp,
        "batch_size": len(batch.items),
        "max_requests_per_master": float(max(masters.values(), default=0)),
        "max_kv_tokens_per_instance": float(max(kv.values(), default=0.0)),
    }


def predict(model: CostModel, rec: Mapping[str, Any]) -> float:
    if rec["kind"] == "prefill":
        return model.prefill_time(int(rec["dop"]), rec["sum_len"], rec["sum_len_sq"], int(rec.get("tp", 1)))
    return model.decode_time(
        rec["max_requests_per_master"],
        rec["max_kv_tokens_per_instance"],
        int(rec["dop"]),
        int(rec.get("tp", 1)),
    )


@dataclass
class Observation:
    record: dict[str, Any]  # with measured_ms
    predicted_s: float

    @property
    def error_ratio(self) -> float:
        """predicted / measured (1.0 = exact)."""
        measured = self.record["measured_ms"] / 1e3
        return self.predicted_s / measured if measured > 0 else math.inf


class Calibrator:
    """Measured vs predicted batch times; periodic refit of the cost model."""

    def __init__(
        self,
        model: CostModel,
        interval_s: float | None,
        min_records: int,
        save_path: str | None = None,
        max_records: int = 4096,
        tp: int = 1,
    ) -> None:
        self.model = model
        self.tp = tp  # TP ranks per instance: the cost model's `tp` of every batch
        self.interval_s = interval_s
        self.min_records = min_records
        self.save_path = save_path
        self.records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self.last_fit: float | None = None
        self.reports: list[FitReport] = []
        self.refits = 0
        self._pending: dict[int, dict[str, Any]] = {}  # batch_id -> record (no time yet)

    def expect(self, batch: PrefillBatch | DecodeBatch) -> None:
        rec = batch_record(batch, self.tp)
        if rec is not None:
            self._pending[batch.batch_id] = rec

    def forget_pending(self) -> None:
        """Drop the expected batches (the group was rebuilt: they will never report)."""
        self._pending.clear()

    def estimate_s(self, batch_id: int) -> float | None:
        """The cost model's time for an expected batch (None: no record form)."""
        rec = self._pending.get(batch_id)
        return predict(self.model, rec) if rec is not None else None

    def observe(self, result: BatchResult) -> Observation | None:
        rec = self._pending.pop(result.batch_id, None)
        if rec is None or result.error or result.elapsed_s <= 0:
            return None
        rec = dict(rec, measured_ms=result.elapsed_s * 1e3)
        self.records.append(rec)
        return Observation(rec, predict(self.model, rec))

    def due(self, now: float) -> bool:
        if self.interval_s is None or len(self.records) < self.min_records:
            return False
        return self.last_fit is None or now - self.last_fit >= self.interval_s

    def refit(self, now: float) -> CostModel:
        """Fit on every record kept; groups with too few records keep the previous
        model's (analytical or profile) coefficients through `cost_fit.fit`."""
        self.last_fit = now
        fitted, self.reports = fit(list(self.records), self.model.model, self.model.hardware)
        # keep coefficients the new records cannot identify (e.g. DoPs never run since)
        for key, coeffs in self.model.prefill_table.items():
            fitted.prefill_table.setdefault(key, coeffs)
        for key, coeffs in self.model.decode_table.items():
            fitted.decode_table.setdefault(key, coeffs)
        for key, c in self.model.chunk_table.items():
            fitted.chunk_table.setdefault(key, c)
        fitted.node_of = self.model.node_of  # the placement stays what it was
        fitted.source = "online-fit"
        fitted.notes = f"refit #{self.refits + 1} from {len(self.records)} live batches"
        fitted.__post_init__()  # fresh caches
        self.model = fitted
        self.refits += 1
        if self.save_path:
            self.save(self.save_path)
        return fitted

    def save(self, path: str) -> None:
        """The profile at `path`, and beside it (`<path>.records.jsonl`) the records it
        was fitted from (cost_fit's schema: what the fit saw, to inspect or refit)."""
        out = Path(path).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        dops = sorted({d for d, _ in self.model.prefill_table})
        self.model.save(out, dops=dops or (1,), tps=(self.tp,))
        lines = (json.dumps(r) + "\n" for r in self.records)
        out.with_name(out.name + ".records.jsonl").write_text("".join(lines))
