"""Long work on the shorts' reserved instance in latency-budget chunks (reserved_budget.py).

Scene: short requests keep arriving (one instance is left to them); long prompt `a`
runs whole on the three others; long prompt `b` arrives with no other instance free.
On the fake clock every plan is checked and the invariants hold."""

from esp_core.sched.plan import TokenRange

from .fake_clock import chunked_a800_scheduler, prefill_by_tokens_step_time, prompt_request, run


def run_scene(**cfg):
    s = chunked_a800_scheduler(**cfg)
    arrivals = [
        (0.0, prompt_request("s0", 50, 2, 0.0)),
        (0.001, prompt_request("a", 90_000, 2, 0.001)),
        (0.002, prompt_request("b", 6_000, 2, 0.002)),
        (0.1, prompt_request("s1", 50, 2, 0.1)),
    ]
    res = run(s, arrivals, keep_plans=True, step_time=prefill_by_tokens_step_time)
    batches = {}
    for p in res.plans:
        for b in p.prefills:
            for it in b.items:
                batches.setdefault(it.request_id, []).append((b, it))
    return s, res, batches


def test_without_the_switch_b_waits_for_a():
    s, res, batches = run_scene()
    a_end = batches["a"][0][1]
    assert a_end.tokens == TokenRange(0, 90_000) and len(batches["a"][0][0].instances) == 3
    (b_first, _), *_ = batches["b"]
    # b starts only after a's prefill: on a's instances or the free one, not before
    assert s.stats["budget_chunks"] == 0
    assert len(res.tokens["b"]) == 2


def test_b_runs_on_the_reserved_instance_in_budget_chunks():
    s, res, batches = run_scene(reserved_budget_chunks=True)
    ((a_batch, _),) = batches["a"]
    b_rings = {b.instances for b, _ in batches["b"]}
    assert b_rings == {tuple(set(range(4)) - set(a_batch.instances))}  # the reserved instance
    b_chunks = [it for _, it in batches["b"]]
    assert len(b_chunks) > 3 and all(len(it.tokens) < 2000 for it in b_chunks)  # cut to the budget
    assert sum(len(it.tokens) for it in b_chunks) == 6_000
    for it in b_chunks:
        t = s.cost.prefill_time(1, len(it.tokens), len(it.tokens) ** 2, s.tp) + s.cost.chunk_cross_time(
            len(it.tokens), it.tokens.start, 1, s.tp
        )
        assert t <= s.config.short_wait_budget_s or len(it.tokens) == s.config.min_chunk_tokens
    assert s.stats["budget_chunks"] >= len(b_chunks) - 1
    # the short request arriving meanwhile is prefilled between b's chunks
    assert res.first_token_time["s1"] - 0.1 < 0.05
    assert len(res.tokens["b"]) == 2 and len(res.tokens["s1"]) == 2
