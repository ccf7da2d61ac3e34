"""Failure accounting (app/failures.py) and its config: who is charged for a failed
batch, when a poison request is dropped, that an innocent request batched with it never
is, the rebuild-rate bound and the watchdog's deadline. The live behaviour (real
instances, real faults) is tests/live/test_zz_failure_loops.py."""

from __future__ import annotations

import pytest

from esp_serve.app.config import ConfigError, load_config
from esp_serve.app.failures import (
    PROVEN_TOKENS,
    RecoveryRate,
    RetryLedger,
    cause_of,
    retries_exhausted_message,
    too_many_recoveries_message,
    watchdog_deadline_s,
)


class Group:
    """A tiny model of the controller around a ledger: requests in the scheduler are
    batched together every iteration; a batch holding a poison request fails. Returns
    what the real controller would see."""

    def __init__(self, retries: int, requests: list[str], poison: set[str]) -> None:
        self.ledger = RetryLedger(retries)
        self.running = list(requests)  # in the scheduler
        self.poison = poison
        self.failed: list[str] = []
        self.done: list[str] = []
        self.recoveries = 0

    def step(self, arrivals: tuple[str, ...] = ()) -> None:
        self.running += list(arrivals)
        batch = list(self.running)
        if self.poison & set(batch):
            self.recoveries += 1
            over = self.ledger.charge(batch)
            self.failed += over
            for rid in over:
                self.ledger.forget(rid)
            # the rebuild: everyone but held suspects back in the scheduler, plus a trial
            self.running = [r for r in batch if r not in over and not self.ledger.is_held(r)]
            self._admit()
            return
        for rid in batch:
            if self.ledger.on_token(rid):
                self._admit()

    def _admit(self) -> None:
        rid = self.ledger.next_trial()
        if rid is not None:
            self.running.append(rid)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def test_a_poison_request_fails_alone_after_retries_plus_one_failures():
    g = Group(retries=2, requests=["a", "p", "b", "c"], poison={"p"})
    g.run(40)
    assert g.failed == ["p"]
    assert g.recoveries == 3  # request_retries + 1
    assert sorted(g.running) == ["a", "b", "c"]  # everyone else serves again
    assert all(g.ledger.failures(r) <= 1 for r in "abc")  # charged once at most
    summary = g.ledger.summary()
    assert summary["requests_failed_after_retries"] == 1 and summary["suspects_waiting"] == 0


@pytest.mark.parametrize("retries", [1, 2, 5])
def test_innocent_requests_survive_any_budget_of_one_or_more(retries):
    g = Group(retries=retries, requests=["p", "a", "b"], poison={"p"})
    g.run(10 * (retries + 2))
    assert g.failed == ["p"]
    assert g.recoveries == retries + 1


def test_two_poison_requests_both_fail_and_innocents_survive():
    g = Group(retries=2, requests=["a", "p", "q", "b"], poison={"p", "q"})
    g.run(60)
    assert sorted(g.failed) == ["p", "q"]
    assert sorted(g.running) == ["a", "b"]


def test_a_request_arriving_while_a_poison_request_is_on_trial_is_charged_once_at_most():
    g = Group(retries=2, requests=["p", "a"], poison={"p"})
    g.step()  # p and a fail together: both suspects
    for i in range(30):
        g.step(arrivals=(f"n{i}",) if i < 5 else ())
    assert g.failed == ["p"]
    assert all(g.ledger.failures(r) <= 1 for r in g.running)


def test_zero_retries_fail_every_request_of_a_failed_batch():
    g = Group(retries=0, requests=["p", "a"], poison={"p"})
    g.step()
    assert sorted(g.failed) == ["a", "p"]


def test_suspects_are_tried_one_at_a_time_and_the_next_waits_for_proof():
    ledger = RetryLedger(retries=2)
    assert ledger.charge(["a", "b", "c"]) == []
    assert [ledger.is_held(r) for r in "abc"] == [True, True, True]
    assert ledger.next_trial() == "a"
    assert ledger.next_trial() is None  # a is on trial
    assert not ledger.on_token("b")  # another request's token proves nothing
    for _ in range(PROVEN_TOKENS - 1):
        assert not ledger.on_token("a")
    assert ledger.on_token("a")  # proven: b's turn
    assert ledger.next_trial() == "b"
    assert ledger.forget("b")  # left while on trial: c's turn
    assert ledger.next_trial() == "c"


def test_a_failure_charges_only_unproven_requests_unless_all_are_proven():
    ledger = RetryLedger(retries=2)
    for _ in range(PROVEN_TOKENS):
        ledger.on_token("old")
    assert ledger.charge(["old", "new"]) == []
    assert ledger.failures("old") == 0 and ledger.failures("new") == 1
    for _ in range(PROVEN_TOKENS):
        ledger.on_token("old")
        ledger.on_token("new")
    ledger.next_trial()
    ledger.charge(["old", "new"])  # a late failure: nobody to single out
    assert ledger.failures("old") == 1 and ledger.failures("new") == 2
    assert list(ledger.suspects) == ["new", "old"]  # charged again: tried first


def test_a_request_past_its_budget_is_returned_once_and_no_longer_held():
    ledger = RetryLedger(retries=1)
    assert ledger.charge(["p"]) == []
    assert ledger.next_trial() == "p"
    assert ledger.charge(["p"]) == ["p"]
    assert not ledger.is_held("p") and ledger.on_trial is None


def test_the_recovery_rate_bound_counts_a_sliding_minute():
    rate = RecoveryRate(per_minute=2)
    assert rate.allow(0.0) and rate.allow(10.0)
    assert not rate.allow(20.0)  # a third within 60 s
    rate = RecoveryRate(per_minute=2)
    assert rate.allow(0.0) and rate.allow(30.0)
    assert rate.allow(60.0)  # the first left the window
    assert not rate.allow(61.0)


def test_the_watchdog_deadline_is_the_floor_or_factor_times_the_estimate():
    assert watchdog_deadline_s(120.0, 20.0, None) == 120.0
    assert watchdog_deadline_s(120.0, 20.0, 0.5) == 120.0  # 10 s < floor
    assert watchdog_deadline_s(120.0, 20.0, 30.0) == 600.0  # a long prefill is not a hang
    assert watchdog_deadline_s(3.0, 20.0, 0.0) == 3.0


def test_the_client_message_names_the_cause_class_and_no_internals():
    cause = cause_of("RuntimeError: injected fault (request x holds token 7)\nTraceback ...")
    assert cause == "RuntimeError"
    message = retries_exhausted_message(cause, 3)
    assert message == "ESP batch failed (RuntimeError) 3 times with this request in it; not retried"
    assert ":" not in message  # the ingress shows the text before a colon, 80 characters
    assert len(retries_exhausted_message("WatchdogTimeout", 3)) <= 80
    stopped = too_many_recoveries_message()
    assert ":" not in stopped and len(stopped) <= 80 and "max_recoveries_per_minute" in stopped
    assert cause_of(None) == "unknown"
    assert cause_of("something odd happened") == "error"


def test_recovery_config_defaults_and_errors_name_the_key():
    r = load_config({}).recovery
    assert (r.request_retries, r.max_recoveries_per_minute) == (2, 6)
    assert (r.watchdog_floor_s, r.watchdog_factor) == (120.0, 20.0)
    assert r.fault_injection_token is None and r.hang_injection_token is None
    with pytest.raises(ConfigError, match=r"recovery\.request_retries: .*greater than or equal to 0"):
        load_config({"recovery": {"request_retries": -1}})
    with pytest.raises(ConfigError, match=r"recovery\.max_recoveries_per_minute"):
        load_config({"recovery": {"max_recoveries_per_minute": 0}})
    with pytest.raises(ConfigError, match=r"recovery\.watchdog_floor_s"):
        load_config({"recovery": {"watchdog_floor_s": 0}})
    with pytest.raises(ConfigError, match=r"recovery\.retries: unknown key"):
        load_config({"recovery": {"retries": 3}})
    with pytest.raises(ConfigError, match="give them different token ids"):
        load_config({"recovery": {"fault_injection_token": 7, "hang_injection_token": 7}})


def test_the_injection_tokens_reach_the_instance_worker_config():
    cfg = load_config({"recovery": {"fault_injection_token": 7, "hang_injection_token": 8}})
    kwargs = cfg.worker_kwargs()
    assert (kwargs["fault_token"], kwargs["hang_token"]) == (7, 8)


def test_the_watchdog_reads_the_cost_models_estimate_of_a_dispatched_batch():
    from esp_core.sched.plan import KVKeep, PrefillBatch, PrefillItem, TokenRange
    from esp_serve.app.calibration import Calibrator, make_cost_model, model_shape

    arch = dict(
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
    )
    cost = make_cost_model(None, "cpu", model_shape(arch, "float32", "8b"))
    calibrator = Calibrator(cost, None, 3)
    tokens = TokenRange(0, 100_000)
    item = PrefillItem("long", tokens, 0, (KVKeep(0, (tokens,)),))
    calibrator.expect(PrefillBatch(1, (0, 1), (item,)))
    estimate = calibrator.estimate_s(1)
    assert estimate is not None and estimate > 6.0  # a 100K-token prefill of an 8B model on CPU
    assert watchdog_deadline_s(120.0, 20.0, estimate) == 20.0 * estimate  # not a hang
    assert calibrator.estimate_s(2) is None  # never dispatched
    calibrator.forget_pending()  # the group was rebuilt
    assert calibrator.estimate_s(1) is None
