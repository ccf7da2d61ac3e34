"""Short requests beside long chunked prompts: isolation, latency budget, no starvation.

Hand-made states on a fake clock (`fake_clock.run` checks invariants and every plan)."""

import numpy as np
import pytest

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import NewRequest, PrefillBatch, SamplingParams, TokenRange
from esp_core.sched.scaling import spread_keeps
from esp_core.sched.scheduler import ESPScheduler

from .fake_clock import run

COST = CostModel.default_a800()


def make(n=4, slots=50_000, **cfg) -> ESPScheduler:
    cfg.setdefault("chunked_prefill", True)
    return ESPScheduler(ClusterSpec(n, slots), COST, ESPSchedulerConfig(**cfg))


def req(rid, prompt_len, max_tokens=4, t=0.0) -> NewRequest:
    return NewRequest(rid, tuple(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens), t)


def chunks_of(res, rid):
    return [(b, it) for p in res.plans for b in p.prefills for it in b.items if it.request_id == rid]


def step_time(b):
    return 0.02 if isinstance(b, PrefillBatch) else 0.002


# ------------------------------------------------------------------ spread_keeps


def test_spread_keeps_splits_evenly_in_ring_order():
    free = np.array([1000, 1000, 1000, 1000])
    keeps = spread_keeps(TokenRange(100, 400), [2, 0, 1], free)
    assert [(k.instance, k.ranges) for k in keeps] == [
        (2, (TokenRange(100, 200),)),
        (0, (TokenRange(200, 300),)),
        (1, (TokenRange(300, 400),)),
    ]
    assert list(free) == [900, 900, 900, 1000]


def test_spread_keeps_caps_shares_by_room_and_fails_without_room():
    free = np.array([30, 1000, 1000])
    keeps = spread_keeps(TokenRange(0, 300), [0, 1, 2], free, headroom=10)
    shares = {k.instance: k.num_tokens for k in keeps}
    assert shares[0] == 20 and sum(shares.values()) == 300  # headroom kept where possible
    assert abs(shares[1] - shares[2]) <= 1
    assert spread_keeps(TokenRange(0, 5000), [0, 1], np.array([10, 10])) is None


# ------------------------------------------------------------------ isolation


def test_long_chunks_leave_an_instance_to_short_requests_while_shorts_arrive():
    s = make(chunk_tokens=2000)
    arrivals = [
        (0.0, req("s0", 50, max_tokens=2)),
        (0.001, req("long", 12_000, max_tokens=2)),
        (0.05, req("s1", 80, max_tokens=2)),
    ]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    rings = [b.instances for b, _ in chunks_of(res, "long")]
    assert rings and all(len(r) <= 3 for r in rings)
    # the short request that arrived mid-prompt started at once, on an instance no chunk held
    ((pb, _),) = chunks_of(res, "s1")
    assert res.first_token_time["s1"] == pytest.approx(0.05 + 0.02)
    assert res.first_token_time["s1"] < res.first_token_time["long"]


def test_without_short_arrivals_long_chunks_use_every_instance():
    s = make(chunk_tokens=2000)
    res = run(s, [(0.0, req("long", 12_000, max_tokens=2))], keep_plans=True, step_time=step_time)
    assert max(len(b.instances) for b, _ in chunks_of(res, "long")) == 4


def test_chunk_kv_is_spread_over_the_ring_and_later_chunks_run_on_the_holders():
    s = make(chunk_tokens=2000)
    res = run(s, [(0.0, req("long", 8000, max_tokens=2))], keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    first_ring = chunks[0][0].instances
    for b, it in chunks:
        assert b.instances == first_ring
        assert {k.instance for k in it.keep} == set(first_ring)
        sizes = [k.num_tokens for k in it.keep]
        assert max(sizes) - min(sizes) <= 1


def test_chunk_on_the_shorts_instances_is_cut_to_the_latency_budget():
    # two instances, the long prompt's KV needs both: its chunks take the shorts'
    # instance too, so each is cut to what the cost model finishes within the budget
    budget = 0.03
    s = make(n=2, slots=7000, chunk_tokens=4000, short_wait_budget_s=budget, min_chunk_tokens=64)
    arrivals = [(0.0, req("s0", 20, max_tokens=1)), (0.001, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    assert sum(len(it.tokens) for _, it in chunks) == 12_000
    on_both = 0
    for b, it in chunks:
        if len(b.instances) == 2:
            on_both += 1
            n, start = len(it.tokens), it.tokens.start
            t = COST.prefill_time(2, n, n * n, 1) + COST.chunk_cross_time(n, start, len(it.cached_holders), 1)
            assert t <= budget or n == 64
    assert on_both >= 1 and s.stats["budget_chunks"] >= 1


def test_short_kv_on_a_long_holder_alternates_decode_steps_with_chunks():
    # one instance: the long prompt holds it between chunks; the short request keeps its
    # KV there too, and the long's later chunks pause its decode group, never twice in a row
    s = make(n=1, slots=20_000, chunk_tokens=1000)
    arrivals = [(0.0, req("long", 6000, max_tokens=2)), (0.03, req("short", 30, max_tokens=6))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    assert len(res.tokens["short"]) == 6 and len(res.tokens["long"]) == 2
    assert res.first_token_time["short"] < res.first_token_time["long"]
    seq = []
    for p in res.plans:
        for b in p.prefills:
            if any(it.request_id == "long" for it in b.items):
                seq.append("C")
        for b in p.decodes:
            if any(it.request_id == "short" for it in b.items):
                seq.append("d")
    first_d = seq.index("d")
    while_decoding = "".join(seq[first_d : seq.index("d", len(seq) - 1 - seq[::-1].index("d"))])
    assert "CC" not in while_decoding


def test_long_request_is_not_starved_by_a_stream_of_shorts():
    # shorts alone keep both instances busy; a ring needs both idle at once: after the
    # aging bound the long prompt's holders drain (no new short work there) for its chunk
    s = make(n=2, slots=20_000, chunk_tokens=1000, long_request_max_wait_s=0.1)
    arrivals = [(0.0, req("long", 5000, max_tokens=2))]
    arrivals += [(0.001 + 0.01 * i, req(f"s{i}", 40, max_tokens=20)) for i in range(200)]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    assert len(res.finishes) == 201
    # the long prompt finished while shorts were still arriving
    assert res.first_token_time["long"] < 1.0


def test_knobs_are_validated():
    with pytest.raises(ValueError):
        ESPSchedulerConfig(short_reserved_instances=-1)
    with pytest.raises(ValueError):
        ESPSchedulerConfig(short_wait_budget_s=0)
    with pytest.raises(ValueError):
        ESPSchedulerConfig(min_chunk_tokens=0)
    with pytest.raises(ValueError):
        ESPSchedulerConfig(short_prompt_tokens=0)


@pytest.mark.parametrize("prompt_len,short", [(300, True), (1000, True), (1001, False), (2000, False)])
def test_only_prompts_up_to_short_prompt_tokens_are_short_requests(prompt_len, short):
    """A prompt of one chunk but more than `short_prompt_tokens` neither switches
    short-request isolation on (the long prompt's chunks still take every instance) nor
    holds a long prompt to chunks while it waits; a shorter one does both."""
    s = make(chunk_tokens=2000, short_prompt_tokens=1000, whole_prompts_without_shorts=True)
    arrivals = [(0.0, req("mid", prompt_len, max_tokens=2)), (0.05, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    if short:  # chunked, its rings off one instance while shorts arrive
        assert len(chunks) == 6 and all(len(b.instances) <= 3 for b, _ in chunks)
    else:  # whole: nothing short around
        ((_, it),) = chunks
        assert it.tokens == TokenRange(0, 12_000) and s.stats["chunks"] == 0
    assert len(res.tokens["mid"]) == 2 and len(res.tokens["long"]) == 2


# ------------------------------------------------------------------ adaptive chunking


def test_adaptive_chunking_prefills_a_long_prompt_whole_when_no_short_waits():
    s = make(chunk_tokens=2000, adaptive_chunking=True)
    arrivals = [(0.0, req("s0", 50, max_tokens=2)), (0.05, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    ((b, it),) = chunks_of(res, "long")
    assert it.tokens == TokenRange(0, 12_000) and it.sample
    # within the long prompts' cap (s0 arrived recently: one instance left to shorts),
    # its KV packed as a whole prompt's (no later chunk attends to it)
    assert len(b.instances) <= 3
    assert len(it.keep) == 1
    assert s.stats["whole_prompt_chunks"] == 1 and s.stats["chunks"] == 1


def test_adaptive_chunking_still_chunks_while_a_short_request_waits():
    # aged at once, the long prompt is planned before the shorts' round, with s0 waiting
    s = make(chunk_tokens=2000, adaptive_chunking=True, long_request_max_wait_s=0.0)
    arrivals = [(0.0, req("s0", 50, max_tokens=2)), (0.0, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    assert len(chunks) == 6 and all(len(it.tokens) == 2000 for _, it in chunks)
    assert s.stats["whole_prompt_chunks"] == 0
    assert len(res.tokens["s0"]) == 2 and len(res.tokens["long"]) == 2


def test_adaptive_chunking_chunks_a_prompt_the_capped_instances_cannot_hold():
    # 3 instances within the cap hold 3 x 5,000 < 16,000 tokens: chunks, KV on all four
    s = make(slots=5000, chunk_tokens=2000, adaptive_chunking=True)
    arrivals = [(0.0, req("s0", 50, max_tokens=2)), (0.05, req("long", 16_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    assert len(chunks) > 1 and sum(len(it.tokens) for _, it in chunks) == 16_000
    assert s.stats["whole_prompt_chunks"] == 0


# ------------------------------------------------------------------ whole prompts without shorts


def test_a_long_prompt_with_no_short_request_around_is_prefilled_whole_not_chunked():
    s = make(chunk_tokens=2000, whole_prompts_without_shorts=True)
    res = run(s, [(0.0, req("long", 12_000, max_tokens=2))], keep_plans=True, step_time=step_time)
    ((b, it),) = chunks_of(res, "long")
    assert it.tokens == TokenRange(0, 12_000) and it.sample
    assert s.stats["chunks"] == 0  # admission and the batching DP planned it, not the chunk path
    assert len(res.tokens["long"]) == 2


def test_a_long_prompt_is_chunked_while_short_requests_arrive():
    s = make(chunk_tokens=2000, whole_prompts_without_shorts=True)
    arrivals = [(0.0, req("s0", 50, max_tokens=2)), (0.05, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    assert len(chunks) == 6 and all(len(it.tokens) == 2000 for _, it in chunks)


def test_a_long_prompt_is_whole_again_once_no_short_arrived_for_the_window():
    s = make(chunk_tokens=2000, whole_prompts_without_shorts=True, short_activity_window_s=1.0)
    arrivals = [(0.0, req("s0", 50, max_tokens=2)), (1.5, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    ((b, it),) = chunks_of(res, "long")
    assert it.tokens == TokenRange(0, 12_000)


def test_a_long_prompt_is_chunked_while_a_short_request_waits():
    # no window: only the waiting short request says shorts are around
    s = make(chunk_tokens=2000, whole_prompts_without_shorts=True, short_activity_window_s=0.0)
    arrivals = [(0.0, req("s0", 50, max_tokens=2)), (0.0, req("long", 12_000, max_tokens=2))]
    res = run(s, arrivals, keep_plans=True, step_time=step_time)
    chunks = chunks_of(res, "long")
    assert len(chunks) > 1 and sum(len(it.tokens) for _, it in chunks) == 12_000
    assert len(res.tokens["s0"]) == 2 and len(res.tokens["long"]) == 2
