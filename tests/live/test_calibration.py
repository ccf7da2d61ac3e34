"""Online calibration (app/calibration.py, pure): batch records, prediction error, refit
from measured times, save + reload of the fitted profile."""

from __future__ import annotations

from esp_core.sched.cost_model import CostModel
from esp_core.sched.model_shape import ModelShape
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    KVKeep,
    PrefillBatch,
    PrefillItem,
    TokenRange,
)
from esp_serve.app.calibration import Calibrator, batch_record, make_cost_model, predict


def prefill(batch_id: int, lens: list[int], dop: int) -> PrefillBatch:
    items = tuple(
        PrefillItem(f"r{batch_id}-{i}", TokenRange(0, n), 0, (KVKeep(0, (TokenRange(0, n),)),))
        for i, n in enumerate(lens)
    )
    return PrefillBatch(batch_id, tuple(range(dop)), items)


def test_records_have_the_cost_fit_schema():
    rec = batch_record(prefill(1, [10, 30], 2))
    assert rec == {"kind": "prefill", "dop": 2, "tp": 1, "sum_len": 40.0, "sum_len_sq": 1000.0}
    dec = DecodeBatch(2, (0, 1), (DecodeItem("a", 5, 99, 0, (0, 1), 0), DecodeItem("b", 5, 9, 0, (0,), 0)))
    rec = batch_record(dec)
    assert rec["max_requests_per_master"] == 2 and rec["dop"] == 2
    assert rec["max_kv_tokens_per_instance"] == 50 + 10  # a split over 2 holders, b on 0


def test_refit_learns_measured_times_and_saves_a_reusable_profile(tmp_path):
    model = make_cost_model(None, "cpu", ModelShape.builtin_tiny())
    cal = Calibrator(model, interval_s=1.0, min_records=5, save_path=str(tmp_path / "p.json"))
    # the "hardware" takes 1 ms + 2 us per token + 1 ns per token^2 at DoP 1
    truth = lambda s, s2: 1e-3 + 2e-6 * s + 1e-9 * s2  # noqa: E731
    errors = []
    for i, n in enumerate([16, 64, 128, 256, 512, 1024, 2048, 100]):
        b = prefill(i, [n], 1)
        cal.expect(b)
        obs = cal.observe(BatchResult(i, "prefill", (0,), elapsed_s=truth(n, n * n)))
        errors.append(abs(obs.error_ratio - 1))
    assert not cal.due(0.0) or cal.last_fit is None
    assert cal.due(10.0)
    fitted = cal.refit(10.0)
    assert fitted.source == "online-fit" and cal.refits == 1
    for n in (32, 700, 1500):
        assert abs(fitted.prefill_time(1, n, n * n) / truth(n, n * n) - 1) < 0.05
    assert max(errors) > 0.05  # the analytical default was off; the refit is what fixed it
    assert not cal.due(10.5)  # interval
    reloaded = make_cost_model(str(tmp_path / "p.json"), "cpu", ModelShape.builtin_tiny())
    assert abs(reloaded.prefill_time(1, 700, 700**2) - fitted.prefill_time(1, 700, 700**2)) < 1e-12
    assert predict(reloaded, batch_record(prefill(99, [700], 1))) > 0


def test_failed_batches_and_chunks_are_not_records():
    cal = Calibrator(CostModel.analytical(ModelShape.builtin_tiny()), None, 3)
    b = prefill(1, [10], 1)
    cal.expect(b)
    assert cal.observe(BatchResult(1, "prefill", (0,), elapsed_s=0.1, error="boom")) is None
    chunk = PrefillBatch(2, (0,), (PrefillItem("c", TokenRange(10, 20), 0, (), (0,)),))
    cal.expect(chunk)
    assert cal.observe(BatchResult(2, "prefill", (0,), elapsed_s=0.1)) is None
    assert not cal.records and not cal.due(1e9)


def test_the_decode_step_of_a_kv_move_is_not_a_record():
    # instances 1-3 hold nothing of the step: their KV moved onto 0 in the same plan
    step = DecodeBatch(3, (0, 1, 2, 3), (DecodeItem("a", 5, 8000, 0, (0,), 0),))
    assert batch_record(step) is None
    assert batch_record(DecodeBatch(4, (0,), step.items))["dop"] == 1
