"""A lone long prompt waits for a wider ring when that finishes it sooner (ring_lookahead.py).

Scene: two short requests decode on instances 0 and 1, long prompt `a` runs whole on
2 and 3; `s1` finishes first, so when `b` (as long as `a`) could start, only instance 1
is idle. On the fake clock every plan is checked and the invariants hold."""

from esp_core.sched.plan import TokenRange

from .fake_clock import chunked_a800_scheduler, prefill_by_tokens_step_time, prompt_request, run


def run_scene(**cfg):
    s = chunked_a800_scheduler(short_reserved_instances=0, **cfg)
    arrivals = [
        (0.0, prompt_request("s0", 50, 400, 0.0)),
        (0.0, prompt_request("s1", 50, 20, 0.0)),
        (0.001, prompt_request("a", 60_000, 2, 0.001)),
        (0.01, prompt_request("b", 60_000, 2, 0.01)),
    ]
    res = run(s, arrivals, keep_plans=True, step_time=prefill_by_tokens_step_time)
    b_batches = [(b, it) for p in res.plans for b in p.prefills for it in b.items if it.request_id == "b"]
    return s, res, b_batches


def test_without_lookahead_the_long_prompt_starts_on_the_one_idle_instance():
    s, res, b_batches = run_scene()
    first, _ = b_batches[0]
    assert first.instances == (1,)
    assert len(b_batches) > 1  # its KV does not fit one instance: chunked, holders fixed
    assert s.stats.get("ring_waits", 0) == 0


def test_lookahead_waits_for_the_running_prompt_and_starts_whole_on_a_wider_ring():
    s, res, b_batches = run_scene(long_start_lookahead=True)
    ((batch, item),) = b_batches
    assert item.tokens == TokenRange(0, 60_000) and item.sample
    assert len(batch.instances) == 3 and 0 not in batch.instances  # s0 still decodes on 0
    assert s.stats["ring_waits"] > 0
    assert len(res.tokens["b"]) == 2 and len(res.tokens["s0"]) == 400


def test_lookahead_does_not_hold_back_a_prompt_another_long_prompt_waits_behind():
    # with a third long prompt queued, the idle instance is worth using at once
    s = chunked_a800_scheduler(short_reserved_instances=0, long_start_lookahead=True)
    arrivals = [
        (0.0, prompt_request("s0", 50, 400, 0.0)),
        (0.0, prompt_request("s1", 50, 20, 0.0)),
        (0.001, prompt_request("a", 60_000, 2, 0.001)),
        (0.01, prompt_request("b", 30_000, 2, 0.01)),
        (0.01, prompt_request("c", 30_000, 2, 0.01)),
    ]
    res = run(s, arrivals, keep_plans=True, step_time=prefill_by_tokens_step_time)
    starts = {
        it.request_id: b.instances
        for p in res.plans
        for b in p.prefills
        for it in b.items
        if not it.tokens.start
    }
    assert starts["b"] == (1,)  # started on the idle instance, c still queued
    assert len(res.tokens["c"]) == 2
