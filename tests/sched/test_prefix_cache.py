"""The prefix cache in the ESP scheduler: the index, adoption, LRU eviction, admission.

Driven like the other policy tests (fake clock, hand-made tokens, invariants and
`check_plan` after every event); exactness of the reused KV is tested where it is
computed (tests/esp/test_prefix_cache_exact.py).
"""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec, FinishReason
from esp_core.sched.kv_accounting import KVAccounting
from esp_core.sched.plan import (
    BatchResult,
    NewRequest,
    ReleaseReason,
    SampledToken,
    SamplingParams,
    TokenRange,
)
from esp_core.sched.prefix_cache import PrefixCache, block_hash_chain
from esp_core.sched.scheduler import ESPScheduler

from .fake_clock import run

COST = CostModel.default_a800()
B = 256


def make(n=4, slots=20_000, **cfg) -> ESPScheduler:
    base = dict(chunked_prefill=True, chunk_tokens=2048, prefix_cache=True, prefix_block_tokens=B)
    return ESPScheduler(ClusterSpec(n, slots), COST, ESPSchedulerConfig(**{**base, **cfg}))


def req(rid, ids, max_tokens=4, t=0.0, hashed=True, after="") -> NewRequest:
    ids = tuple(ids)
    hashes = block_hash_chain(ids, B) if hashed else ()
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return NewRequest(rid, ids, sampling, t, hashes, prefill_after=after)


def doc(n, base=10_000):
    return list(range(base, base + n))


def adoptions(res):
    return [a for p in res.plans for a in p.adoptions]


# ---------------------------------------------------------------- the index


def test_hash_chain_names_prefixes():
    a = block_hash_chain(doc(1000), B)
    b = block_hash_chain(doc(600) + [7] * 400, B)
    assert len(a) == 3 and len(b) == 3  # full blocks only
    assert a[:2] == b[:2] and a[2] != b[2]
    # continuing a chain from block k equals hashing the whole sequence
    assert block_hash_chain(doc(1000), B, a[0], first_block=1) == a[1:]


def test_lookup_longest_whole_block_prefix_leaving_one_token():
    cache = PrefixCache(B)
    cache.insert("e", block_hash_chain(doc(800), B), 800)
    hit = cache.lookup(block_hash_chain(doc(700), B), 700)
    assert hit is not None and (hit.rid, hit.tokens) == ("e", 512)
    # a prompt of exactly 3 blocks must still compute its last token: 2 blocks reused
    hit = cache.lookup(block_hash_chain(doc(768), B), 768)
    assert hit is not None and hit.tokens == 512
    assert cache.lookup(block_hash_chain([1] * 600, B), 600) is None
    assert cache.remove("e").tokens == 800 and cache.lookup(block_hash_chain(doc(700), B), 700) is None
    cache.check_invariants()


def test_entry_indexes_only_blocks_its_kv_covers():
    cache = PrefixCache(B)
    cache.insert("e", block_hash_chain(doc(1024), B), 600)  # KV of 600 positions: 2 blocks
    assert cache.lookup(block_hash_chain(doc(1024), B), 1024).tokens == 512


def test_kv_share_prefix_holds_the_same_slots_twice_and_frees_them_with_the_last_holder():
    kv = KVAccounting(2, 1000)
    kv.place("e", 0, [TokenRange(0, 300)])
    kv.place("e", 1, [TokenRange(300, 700)])
    assert kv.can_share_prefix("e", "r", 512, reserve=200)
    assert not kv.can_share_prefix("e", "r", 800)  # e holds only [0, 700)
    kv.share_prefix("e", "r", 512)
    assert kv.ranges_on("r", 1) == (TokenRange(300, 512),) and kv.tokens_of("e") == 700
    assert kv.free_slots() == [700, 600]  # nothing new: the same slots, counted once
    kv.place("r", 1, [TokenRange(512, 600)])
    assert kv.shareable("r", 600) == 600 and kv.shareable("e", 400) == 0  # (no split of [0, 512))
    kv.release("e")  # e's [512, 700) goes, the shared [0, 512) stays with r
    assert kv.free_slots() == [700, 700] and kv.tokens_of("r") == 600
    kv.check_invariants()
    kv.release("r")
    assert kv.free_slots() == [1000, 1000] and not kv.segments()
    kv.check_invariants()


def test_kv_adopt_renames_prefix_and_frees_the_rest():
    kv = KVAccounting(3, 1000)
    kv.place("e", 0, [TokenRange(0, 300)])
    kv.place("e", 1, [TokenRange(300, 700)])
    kv.place("e", 2, [TokenRange(700, 900)])
    assert kv.adopt("e", "r", 512) == (0, 1, 2)
    assert kv.holders("r") == (0, 1) and kv.holders("e") == ()
    assert kv.ranges_on("r", 1) == (TokenRange(300, 512),)
    assert kv.free_slots() == [700, 788, 1000]
    kv.check_invariants()
    with pytest.raises(ValueError):
        kv.adopt("r", "x", 600)  # r holds only [0, 512)


# ---------------------------------------------------------------- the scheduler


def test_second_question_adopts_the_document_and_prefills_only_the_rest():
    s = make()
    first = req("q1", doc(3000) + [1, 2, 3], max_tokens=4)
    second = req("q2", doc(3000) + [4, 5, 6, 7], max_tokens=4, t=1.0)
    res = run(s, [(0.0, first), (1.0, second)], keep_plans=True)
    assert res.finishes == {"q1": FinishReason.LENGTH, "q2": FinishReason.LENGTH}
    (ad,) = adoptions(res)
    assert (ad.src_rid, ad.dst_rid, ad.keep_len) == ("q1", "q2", 2816)  # 11 whole blocks
    items = [it for p in res.plans for b in p.prefills for it in b.items if it.request_id == "q2"]
    assert items[0].tokens == TokenRange(2816, 3004) and set(items[0].cached_holders) == set(ad.instances)
    # q1 was never released: its KV turned into q2's; q2's KV is the cache entry now
    assert not [r for p in res.plans for r in p.releases]
    stats = s.prefix_cache_stats()
    assert stats["hits"] == 1 and stats["hit_tokens"] == 2816
    assert sum(stats["cached_tokens_per_instance"]) == 3004 + 4 - 1
    assert sum(s.kv_free_slots()) == 4 * 20_000 - (3004 + 3)


def test_event_carries_cached_tokens():
    s = make()
    run(s, [(0.0, req("a", doc(700), max_tokens=1))])
    s.add_request(req("b", doc(700), max_tokens=1, t=1.0), 1.0)
    plan = s.schedule(1.0)
    assert [a.keep_len for a in plan.adoptions] == [512]
    (pb,) = plan.prefills
    (ev,) = s.update(BatchResult(pb.batch_id, "prefill", pb.instances, (SampledToken("b", 9),)), 1.1)
    assert ev.num_cached_tokens == 512 and ev.num_prompt_tokens == 700


def test_partial_block_share_hits_the_whole_blocks_only():
    s = make()
    res = run(
        s,
        [(0.0, req("a", doc(300) + [1] * 200)), (1.0, req("b", doc(300) + [2] * 200, t=1.0))],
        keep_plans=True,
    )
    assert [a.keep_len for a in adoptions(res)] == [256]


def test_multi_turn_hits_the_answer_blocks_too():
    s = make()
    prompt1 = doc(500)
    answer = [50_000 + k for k in range(100)]
    res = run(s, [(0.0, req("t1", prompt1, max_tokens=100))], token_fn=lambda rid, k: 50_000 + k)
    assert res.tokens["t1"] == answer
    # turn 2 = turn-1 prompt + answer + new text: KV of 599 positions, 2 whole blocks
    turn2 = req("t2", prompt1 + answer + [9] * 50, t=1.0)
    res = run(s, [(1.0, turn2)], keep_plans=True)
    assert [a.keep_len for a in adoptions(res)] == [512]


def test_short_first_turn_is_cached_once_its_answer_fills_a_block():
    s = make()
    prompt1 = doc(100)  # no whole block: the request carries no hashes
    assert req("t1", prompt1).block_hashes == ()
    res = run(s, [(0.0, req("t1", prompt1, max_tokens=300))], token_fn=lambda rid, k: 60_000 + k)
    turn2 = req("t2", prompt1 + res.tokens["t1"] + [9] * 20, t=1.0)
    res = run(s, [(1.0, turn2)], keep_plans=True)
    assert [a.keep_len for a in adoptions(res)] == [256]


def test_concurrent_hits_copy_the_entry_then_the_last_adopts_it():
    s = make()
    run(s, [(0.0, req("a", doc(1000), max_tokens=1))])
    res = run(
        s,
        [(1.0, req("b", doc(1000), t=1.0)), (1.0, req("c", doc(1000) + [5], t=1.0))],
        keep_plans=True,
    )
    ads = adoptions(res)
    assert [(a.dst_rid, a.share, a.keep_len) for a in ads] == [("b", True, 768), ("c", False, 768)]
    assert {k.instance for k in ads[0].kept} <= set(ads[0].instances)
    first = [it for p in res.plans for b in p.prefills for it in b.items if it.tokens.start == 768]
    assert {it.request_id for it in first} == {"b", "c"}
    assert set(res.finishes) == {"b", "c"}
    assert s.prefix_cache_stats()["shared_tokens"] == 768


def test_concurrent_readers_share_one_entry_in_a_small_pool():
    s = make(n=1, slots=1_900)
    run(s, [(0.0, req("a", doc(1000), max_tokens=1))])
    res = run(s, [(1.0, req("b", doc(1000), t=1.0)), (1.0, req("c", doc(1000), t=1.0))], keep_plans=True)
    # no room for a second 768-token prefix beside the entry, but none is needed: b
    # shares the entry's slots and c adopts it, both at once
    ads = adoptions(res)
    assert [(a.src_rid, a.dst_rid, a.share) for a in ads] == [("a", "b", True), ("a", "c", False)]
    assert set(res.finishes) == {"b", "c"}


def test_a_request_copies_the_prefix_of_one_still_decoding():
    s = make()
    # a decodes for ~1 s (200 steps of 5 ms); b arrives while it runs
    res = run(
        s,
        [(0.0, req("a", doc(1000), max_tokens=200)), (0.3, req("b", doc(1000) + [5], t=0.3))],
        keep_plans=True,
    )
    ads = adoptions(res)
    assert [(a.src_rid, a.dst_rid, a.share, a.keep_len) for a in ads] == [("a", "b", True, 768)]
    first = [it for p in res.plans for b in p.prefills for it in b.items if it.request_id == "b"]
    assert first[0].tokens.start == 768
    assert res.first_token_time["b"] < res.end_time - 0.5  # b did not wait for a to finish
    assert set(res.finishes) == {"a", "b"} and len(res.tokens["a"]) == 200
    stats = s.prefix_cache_stats()
    assert stats["live_hits"] == 1 and stats["shared_tokens"] == 768


def test_a_reader_arriving_during_the_prefill_waits_for_it_and_copies():
    s = make()
    res = run(
        s,
        [(0.0, req("a", doc(1000), max_tokens=100)), (0.001, req("b", doc(1000) + [5], t=0.001))],
        keep_plans=True,
    )
    (ad,) = adoptions(res)
    assert (ad.src_rid, ad.dst_rid, ad.share, ad.keep_len) == ("a", "b", True, 768)
    b_items = [it for p in res.plans for b in p.prefills for it in b.items if it.request_id == "b"]
    assert [it.tokens.start for it in b_items] == [768]  # never started cold
    assert set(res.finishes) == {"a", "b"}


def choices(n, ids, max_tokens=20, t=0.0, **kw):
    """The n choices of one request: choice 0 prefills, the others name it as sibling."""
    return [(t, req(f"c{j}", ids, max_tokens, t, after="c0" if j else "", **kw)) for j in range(n)]


def prefill_starts(res, rid):
    return [it.tokens.start for p in res.plans for b in p.prefills for it in b.items if it.request_id == rid]


def test_choices_wait_for_the_whole_prompt_of_their_sibling_then_share_it():
    s = make()  # 3000 tokens: choice 0 prefills in two chunks (2048, then 952)
    res = run(s, choices(3, doc(3000)), keep_plans=True)
    ads = adoptions(res)
    # without the link, choice 1 would copy the first chunk and compute [2048, 3000) again
    assert sorted((a.src_rid, a.dst_rid, a.share, a.keep_len) for a in ads) == [
        ("c0", "c1", True, 2816),
        ("c0", "c2", True, 2816),
    ]
    assert prefill_starts(res, "c0") == [0, 2048]
    assert prefill_starts(res, "c1") == prefill_starts(res, "c2") == [2816]  # the last partial block
    assert res.tokens["c1"] == res.tokens["c2"] == res.tokens["c0"] and len(res.tokens["c0"]) == 20
    assert s.prefix_cache_stats()["live_hits"] == 2


def test_an_aborted_sibling_does_not_strand_the_other_choices():
    s = make()
    # choice 0 is aborted during its first chunk: the others are admitted as usual
    res = run(s, choices(3, doc(3000)), aborts=[(0.005, "c0")], keep_plans=True)
    assert res.finishes == {"c0": FinishReason.ABORT, "c1": FinishReason.LENGTH, "c2": FinishReason.LENGTH}
    assert all(a.src_rid != "c0" for a in adoptions(res))
    assert prefill_starts(res, "c1")[0] == 0  # one of them computes the prompt again
    assert sum(s.kv_free_slots()) + sum(s.prefix_cache_stats()["cached_tokens_per_instance"]) == 4 * 20_000


@pytest.mark.parametrize("cache", [True, False])
def test_a_finished_or_unknown_sibling_holds_nothing_back(cache):
    s = make(prefix_cache=cache)
    run(s, [(0.0, req("c0", doc(1000), max_tokens=1))])  # finished before its siblings came
    late = [
        (1.0, req("c1", doc(1000), t=1.0, after="c0")),
        (1.0, req("x", doc(1000, base=1), t=1.0, after="?")),
    ]
    res = run(s, late, keep_plans=True)
    assert set(res.finishes) == {"c1", "x"}
    assert prefill_starts(res, "c1") == ([768] if cache else [0])  # (the entry c0 left)
    assert prefill_starts(res, "x") == [0]


def test_a_chunked_prompt_is_a_source_once_its_chunk_completed():
    s = make(chunk_tokens=512)
    # a's 2000-token prompt runs in 512-token chunks; b arrives after a few of them
    res = run(
        s,
        [(0.0, req("a", doc(2000), max_tokens=50)), (0.025, req("b", doc(2000) + [7], t=0.025))],
        keep_plans=True,
    )
    (ad,) = adoptions(res)
    assert (ad.src_rid, ad.dst_rid, ad.share) == ("a", "b", True)
    assert 0 < ad.keep_len < 2000 and ad.keep_len % B == 0
    assert set(res.finishes) == {"a", "b"}


def test_a_request_that_took_the_prefix_is_a_source_too():
    s = make()
    run(s, [(0.0, req("a", doc(1000), max_tokens=1))])  # entry a
    res = run(
        s,
        [(1.0, req("b", doc(1000), max_tokens=200, t=1.0)), (1.3, req("c", doc(1000) + [5], t=1.3))],
        keep_plans=True,
    )
    ads = adoptions(res)
    assert [(a.src_rid, a.dst_rid, a.share) for a in ads] == [("a", "b", False), ("b", "c", True)]
    assert set(res.finishes) == {"b", "c"}


def test_disabled_cache_releases_at_finish():
    s = make(prefix_cache=False)
    res = run(s, [(0.0, req("a", doc(1000))), (1.0, req("b", doc(1000), t=1.0))], keep_plans=True)
    assert not adoptions(res)
    assert {r.request_id for p in res.plans for r in p.releases} == {"a", "b"}
    assert sum(s.kv_free_slots()) == 4 * 20_000


def test_requests_without_hashes_are_not_cached():
    s = make()
    res = run(s, [(0.0, req("a", doc(1000), hashed=False))], keep_plans=True)
    assert [r.request_id for p in res.plans for r in p.releases] == ["a"]
    assert s.prefix_cache_stats()["entries"] == 0


def test_aborted_requests_are_not_cached():
    s = make()
    res = run(s, [(0.0, req("a", doc(1000), max_tokens=50))], aborts=[(0.03, "a")], keep_plans=True)
    assert res.finishes["a"] == FinishReason.ABORT
    assert s.prefix_cache_stats()["entries"] == 0
    assert sum(s.kv_free_slots()) == 4 * 20_000


def test_lru_entries_evicted_when_admission_needs_their_slots():
    s = make(n=2, slots=2_000)
    arrivals = [(float(i), req(f"d{i}", doc(900, base=100_000 * (i + 1)), t=float(i))) for i in range(3)]
    res = run(s, arrivals, keep_plans=True)
    assert s.prefix_cache_stats()["entries"] == 3  # 3 x 903 fits 4000
    # a long prompt needs most of the pool: the oldest entries go first
    res = run(s, [(10.0, req("big", doc(2500, base=900_000), max_tokens=8, t=10.0))], keep_plans=True)
    released = [r for p in res.plans for r in p.releases]
    assert [r.request_id for r in released[:2]] == ["d0", "d1"]
    assert all(r.reason == ReleaseReason.FINISHED for r in released)
    assert res.finishes["big"] == FinishReason.LENGTH
    assert "d0" not in s.kv.requests() and s.prefix_cache_stats()["evicted_tokens"] >= 2 * 903


def test_a_document_shared_by_entries_counts_once_against_demand():
    # b and c read the document together, so their entries share its 768 slots: the
    # cache holds ~1250 slots, not the ~2000 its entries' lengths add up to
    s = make(n=1, slots=4_000)
    run(s, [(0.0, req("a", doc(1000), max_tokens=1))])
    run(s, [(1.0, req("b", doc(1000), t=1.0)), (1.0, req("c", doc(1000) + [5], t=1.0))])
    assert s.prefix_cache_stats()["entries"] == 2
    # fits beside the cached document (~2750 free), not beside 2000 cached slots
    res = run(s, [(2.0, req("big", doc(2300, base=900_000), max_tokens=8, t=2.0))], keep_plans=True)
    assert res.finishes["big"] == FinishReason.LENGTH
    assert [r.request_id for p in res.plans for r in p.releases] == []
    res = run(s, [(3.0, req("d", doc(1000) + [6], t=3.0))], keep_plans=True)
    assert [(a.src_rid in {"b", "c"}, a.keep_len) for a in adoptions(res)] == [(True, 768)]


def test_a_choice_held_for_its_resumed_sibling_keeps_no_entry_from_it():
    """A choice held for its sibling (n > 1) does not keep the entry it would hit from
    the room that sibling needs: a sibling resumed after a fault (not fresh: no lookup)
    that needs the entry's slots gets them, then the held choice shares its prompt."""
    s = make(n=1, slots=1200, chunk_tokens=512)  # a's 650-token re-prefill is chunked
    run(s, [(0.0, req("e", doc(700), max_tokens=1))])  # its KV stays: 700 of 1200 slots
    assert s.prefix_cache_stats()["entries"] == 1
    # b queues ahead of its sibling a (as when a is preempted and queued again); a
    # needs 600 + 50 outputs re-prefilled + 50 more > the 500 slots outside the cache
    s.add_request(req("b", doc(600), max_tokens=4, after="a"), now=1.0)
    s.add_resumed_request(req("a", doc(600), max_tokens=100), [5] * 50, now=1.0)
    res = run(s, [])  # (raises when a call plans nothing while work is left)
    assert set(res.finishes) == {"a", "b"}
    assert len(res.tokens["a"]) == 50 and len(res.tokens["b"]) == 4


def test_admission_counts_cached_kv_as_free():
    # the pool is full of entries; a new request still gets in (and the newest entry,
    # the one it hits, is kept when the oldest suffices)
    s = make(n=1, slots=3_000)
    run(s, [(0.0, req("old", doc(1400, base=500_000), max_tokens=1))])
    run(s, [(1.0, req("new", doc(1400), max_tokens=1, t=1.0))])
    assert s.prefix_cache_stats()["entries"] == 2
    res = run(s, [(2.0, req("hit", doc(1400) + [5] * 200, max_tokens=100, t=2.0))], keep_plans=True)
    assert [a.src_rid for a in adoptions(res)] == ["new"]
    assert [r.request_id for p in res.plans for r in p.releases] == ["old"]
    assert res.finishes["hit"] == FinishReason.LENGTH


# ---------------------------------------------------------------- properties


@st.composite
def cache_workloads(draw):
    n = draw(st.integers(1, 3))
    slots = draw(st.integers(500, 3_000))  # small pools: entries must be evicted
    docs = [doc(draw(st.integers(100, 900)), base=10_000 * (d + 1)) for d in range(draw(st.integers(1, 4)))]
    arrivals, aborts = [], []
    for i in range(draw(st.integers(2, 12))):
        t = draw(st.floats(0.0, 2.0))  # spread out: entries form, then are hit or evicted
        base = docs[draw(st.integers(0, len(docs) - 1))]
        cut = draw(st.integers(1, len(base)))
        # with twins: several requests on one prefix at once (concurrent readers: copies),
        # or a little later, while the first still runs (copies from a live request)
        # or the choices of one n > 1 request (siblings: one prompt, linked to the first)
        siblings = draw(st.booleans())
        first_tail: list[int] = []
        for twin in range(draw(st.sampled_from([1, 1, 2, 3]))):
            tail = draw(st.lists(st.integers(1, 9), max_size=200))
            t_twin = t + draw(st.sampled_from([0.0, 0.0, 0.005, 0.02, 0.05, 0.2]))
            after = f"r{i}.0" if siblings and twin else ""
            if after:
                tail, t_twin = first_tail, t
            elif twin == 0:
                first_tail = tail
            max_tokens = draw(st.sampled_from([1, 10, 40, 150, 150]))
            r = req(f"r{i}.{twin}", base[:cut] + tail, max_tokens=max_tokens, t=t_twin, after=after)
            arrivals.append((t_twin, r))
            if draw(st.booleans()) and draw(st.booleans()):
                aborts.append((t_twin + draw(st.floats(0.0, 0.2)), r.request_id))
    flags = dict(spread_chunk_kv=draw(st.booleans()))
    return n, slots, sorted(arrivals, key=lambda a: a[0]), aborts, flags


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_workloads())
def test_random_finish_hit_copy_evict_sequences_keep_kv_invariants(w):
    n, slots, arrivals, aborts, flags = w
    s = make(n=n, slots=slots, chunk_tokens=512, **flags)
    res = run(s, arrivals, aborts=aborts)  # invariants + check_plan after every event
    ids = {r.request_id for _, r in arrivals}
    assert set(res.finishes) | set(res.rejected) == ids
    for rid, reason in res.finishes.items():
        if reason == FinishReason.LENGTH:
            max_tokens = next(r for _, r in arrivals if r.request_id == rid).sampling.max_tokens
            assert len(res.tokens[rid]) == max_tokens
    stats = s.prefix_cache_stats()
    event(f"live hits: {min(stats['live_hits'], 2)}")  # (hypothesis statistics: are they drawn)
    assert not s.state.prefix_cache.sources()  # nothing runs: no share source is left
    used = sum(n * [slots]) - sum(s.kv_free_slots())
    assert used == sum(stats["cached_tokens_per_instance"])  # only entries hold KV now


def test_kv_step_reads_count_a_shared_segment_once():
    """A decode step's KV read per instance: own tokens of each request, a segment its
    readers share once (the scheduler's step estimate, shared-prefix attention)."""
    kv = KVAccounting(2, 1000)
    kv.place("e", 0, [TokenRange(0, 300)])
    kv.place("e", 1, [TokenRange(300, 500)])
    kv.share_prefix("e", "r", 400)
    kv.share_prefix("e", "s", 400)
    kv.place("r", 1, [TokenRange(400, 420)])
    kv.place("s", 0, [TokenRange(400, 410)])
    assert kv.step_reads(["r", "s"]) == {0: 300 + 10, 1: 100 + 20}
    assert kv.step_reads(["e", "r"]) == {0: 300, 1: 200 + 20}  # e owns [400, 500) on 1
    assert kv.step_reads(["r"]) == kv.placement("r")
