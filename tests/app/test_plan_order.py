"""PlanTurns (app/plan_order.py): an instance's sub-plans run in the controller's order
whatever order its threads take them in; a reset refuses the old generation's waiting
sub-plans; a missing sub-plan fails the ones after it instead of blocking forever."""

from __future__ import annotations

import threading

import pytest

from esp_serve.app.plan_order import PlanTurns, SequenceGap, StaleSubPlan


def run_threads(targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def test_sub_plans_run_in_sequence_order_whatever_order_they_arrive_in():
    turns = PlanTurns(wait_s=30)
    ran: list[int] = []
    started = threading.Event()

    def sub_plan(seq: int):
        def body():
            if seq == 0:
                started.wait(5)  # the later sub-plan is already waiting for its turn
            with turns.turn(1, seq):
                ran.append(seq)

        return body

    def later():
        started.set()
        sub_plan(1)()

    run_threads([sub_plan(0), later, sub_plan(2)])
    assert ran == [0, 1, 2]


def test_a_new_generation_starts_a_new_sequence():
    turns = PlanTurns(wait_s=5)
    for seq in range(3):
        with turns.turn(1, seq):
            pass
    with turns.turn(2, 0):  # after a rebuild
        pass
    with pytest.raises(StaleSubPlan):
        with turns.turn(1, 3):
            pass


def test_reset_refuses_sub_plans_of_the_old_generation_waiting_for_their_turn():
    turns = PlanTurns(wait_s=30)
    errors: list[BaseException] = []
    with turns.turn(1, 0):
        pass

    def waiting():  # sub-plan 2: sub-plan 1 never comes (its instance failed it)
        try:
            with turns.turn(1, 2):
                pass
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=waiting)
    t.start()
    with turns.exclusive(2):  # the controller's recovery: reset
        pass
    t.join(10)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], StaleSubPlan)
    with turns.turn(3, 0):  # the rebuilt group's first sub-plan
        pass


def test_reset_waits_for_the_running_sub_plan():
    turns = PlanTurns(wait_s=30)
    order: list[str] = []
    inside = threading.Event()

    def running():
        with turns.turn(1, 0):
            inside.set()
            threading.Event().wait(0.2)
            order.append("sub-plan")

    def reset():
        inside.wait(5)
        with turns.exclusive(2):
            order.append("reset")

    run_threads([running, reset])
    assert order == ["sub-plan", "reset"]


def test_a_sequence_gap_fails_instead_of_blocking_forever():
    turns = PlanTurns(wait_s=0.2)
    with pytest.raises(SequenceGap, match="waited"):
        with turns.turn(1, 1):  # sub-plan 0 never arrives
            pass
