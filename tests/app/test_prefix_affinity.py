"""Prefix-affinity routing (app/affinity.py, app/routing.py): the group that was sent a
prompt's prefix gets its follow-ups while it has room; otherwise KV headroom decides."""

from __future__ import annotations

import asyncio

import pytest

from esp_core.sched.plan import SamplingParams
from esp_core.sched.prefix_cache import block_hash_chain
from esp_serve.app.affinity import AffinityPolicy, RoutedPrefixes, affinity_choice, rank_with_affinity
from esp_serve.app.saturation import GroupLoad, rank_groups

BLOCK = 64
POLICY = AffinityPolicy(block_tokens=BLOCK, min_match=0.5, max_imbalance=0.5)


def doc(n_tokens: int, seed: int) -> tuple[int, ...]:
    return tuple((seed * 7919 + i * 31) % 30000 for i in range(n_tokens))


def load(used: int, total: int = 4096, queued: int = 0) -> GroupLoad:
    return GroupLoad(used, total, queued)


DOC = doc(640, seed=1)  # 10 blocks
QUESTION = DOC + doc(40, seed=2)  # the same document, another question: 10 of 10 blocks match
HASHES = block_hash_chain(QUESTION, BLOCK)


def routed_doc_to(group: str) -> RoutedPrefixes[str]:
    routed: RoutedPrefixes[str] = RoutedPrefixes(1000)
    routed.record(group, block_hash_chain(DOC + doc(30, seed=3), BLOCK))
    return routed


def test_routed_prefixes_match_leading_blocks_and_forget_tails_first():
    routed: RoutedPrefixes[str] = RoutedPrefixes(1000)
    routed.record("a", block_hash_chain(DOC, BLOCK))
    assert routed.matched_blocks("a", HASHES) == 10
    assert routed.matched_blocks("b", HASHES) == 0
    other = block_hash_chain(doc(640, seed=9), BLOCK)
    assert routed.matched_blocks("a", other) == 0
    # a capacity of 6 blocks keeps the head of the last chain: a prefix of it still matches
    small: RoutedPrefixes[str] = RoutedPrefixes(1000)
    small.record("a", block_hash_chain(DOC, BLOCK), capacity_blocks=6)
    assert len(small) == 6 and small.matched_blocks("a", HASHES) == 6
    # a newer chain pushes out the older one's tail, not its head
    small.record("a", other[:3], capacity_blocks=6)
    assert small.matched_blocks("a", HASHES) == 3 and small.matched_blocks("a", other) == 3
    # bounded per group whatever the capacity says
    tiny: RoutedPrefixes[str] = RoutedPrefixes(4)
    tiny.record("a", HASHES, capacity_blocks=1000)
    assert len(tiny) == 4
    routed.record("b", other)
    routed.keep_only(["b"])
    assert routed.groups() == {"b"} and routed.matched_blocks("a", HASHES) == 0
    routed.forget("b")
    assert len(routed) == 0
    with pytest.raises(ValueError):
        RoutedPrefixes(0)


def test_follow_up_goes_to_the_prefix_holder_even_with_less_headroom():
    loads = {"a": load(1500), "b": load(0)}  # headroom alone picks b
    routed = routed_doc_to("a")
    assert rank_groups(loads, len(QUESTION)) == [["b"], ["a"]]
    assert rank_with_affinity(loads, len(QUESTION), HASHES, routed, POLICY) == [["a"], ["b"]]


def test_headroom_decides_without_a_long_enough_match():
    loads = {"a": load(1500), "b": load(0)}
    routed = routed_doc_to("a")
    other = block_hash_chain(doc(700, seed=5), BLOCK)
    assert affinity_choice(loads, 700, other, routed, POLICY) is None
    # the document is 2 of 12 blocks of this prompt: under min_match
    long_prompt = DOC[:128] + doc(640, seed=6)
    hashes = block_hash_chain(long_prompt, BLOCK)
    assert routed.matched_blocks("a", hashes) == 2
    assert rank_with_affinity(loads, len(long_prompt), hashes, routed, POLICY) == [["b"], ["a"]]
    assert affinity_choice(loads, 0, (), routed, POLICY) is None


def test_holder_without_room_or_far_busier_loses_the_prompt():
    routed = routed_doc_to("a")
    n = len(QUESTION)
    # no KV for the 40 uncached tokens: waiting there would cost more than the prefill
    assert affinity_choice({"a": load(4080), "b": load(0)}, n, HASHES, routed, POLICY) is None
    # room, but 0.6 of a group busier than b (max_imbalance 0.5)
    assert affinity_choice({"a": load(2600), "b": load(140)}, n, HASHES, routed, POLICY) is None
    # 0.45 busier: still the holder
    assert affinity_choice({"a": load(2000), "b": load(160)}, n, HASHES, routed, POLICY) == "a"
    # a holder that has not reported yet was just sent the prefix: kept
    assert affinity_choice({"a": None, "b": load(0)}, n, HASHES, routed, POLICY) == "a"


def test_longest_match_wins_then_headroom():
    routed: RoutedPrefixes[str] = RoutedPrefixes(1000)
    routed.record("a", block_hash_chain(DOC[:384], BLOCK))  # 6 blocks
    routed.record("b", block_hash_chain(DOC, BLOCK))  # 10 blocks
    routed.record("c", block_hash_chain(DOC, BLOCK))
    loads = {"a": load(0), "b": load(900), "c": load(300)}
    assert rank_with_affinity(loads, len(QUESTION), HASHES, routed, POLICY) == [["c"], ["a"], ["b"]]


class _Replica:
    def __init__(self, name: str, stats: dict | None) -> None:
        self.name, self.replica_id, self.routing_stats = name, name, stats


def _router(**kwargs):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from esp_serve.app.routing import HeadroomRequestRouter

    router = HeadroomRequestRouter(DeploymentID("ESPController", "app"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    return router


def _pending(prompt: tuple[int, ...], hashes: tuple[int, ...]):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from esp_serve.app.protocol import GenerateRequest

    req = GenerateRequest("r", prompt, SamplingParams(), block_hashes=hashes)
    return PendingRequest(args=[req], kwargs={}, metadata=RequestMetadata("r", "r", call_method="submit"))


def test_router_sends_follow_ups_where_the_prefix_went_and_forgets_dead_replicas():
    from esp_serve.app.config import load_config
    from esp_serve.app.routing import block_hashes_of, router_kwargs

    kwargs = router_kwargs(load_config({}))
    assert kwargs["prefix_affinity"] and kwargs["block_tokens"] == 64
    router = _router(**kwargs)
    busy = _Replica("busy", load(1500).to_stats())
    empty = _Replica("empty", load(0).to_stats())
    router._replicas = {r.replica_id: r for r in (busy, empty)}

    async def chosen(pending) -> list[list[str]]:
        ranks = await router.choose_replicas([busy, empty], pending)
        return [[r.name for r in rank] for rank in ranks]

    async def scenario() -> None:
        first = _pending(DOC, block_hash_chain(DOC, BLOCK))
        assert block_hashes_of(first) == block_hash_chain(DOC, BLOCK)
        assert await chosen(first) == [["empty"], ["busy"]]  # nothing remembered: headroom
        router.on_request_routed(first, "busy", None)  # Serve placed it on busy after all
        follow_up = _pending(QUESTION, HASHES)
        assert await chosen(follow_up) == [["busy"], ["empty"]]
        router.on_replica_actor_died("busy")
        assert await chosen(follow_up) == [["empty"], ["busy"]]
        # affinity off (config): headroom only, nothing remembered
        off = _router(**router_kwargs(load_config({"groups": {"prefix_affinity": False}})))
        off.on_request_routed(first, "busy", None)
        assert len(off.routed) == 0

    # its own loop, not asyncio.run: that leaves no current loop for later tests that
    # build a PendingRequest outside one
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_router_settings_reach_serve():
    from ray.serve.config import RequestRouterConfig

    from esp_serve.app.builder import controller_options
    from esp_serve.app.config import load_config

    cfg = load_config({"groups": {"affinity_min_match": 0.8}, "prefix_cache": {"block_tokens": 32}})
    router_config = RequestRouterConfig(**controller_options(cfg)["request_router_config"])
    assert router_config.request_router_kwargs["min_match"] == 0.8
    assert router_config.request_router_kwargs["block_tokens"] == 32
    no_cache = load_config({"prefix_cache": {"enabled": False}})
    assert (
        controller_options(no_cache)["request_router_config"]["request_router_kwargs"]["prefix_affinity"]
        is False
    )


def test_ingress_hashes_each_prompt_once_for_its_choices():
    from esp_serve.app.requests import SubRequest, with_block_hashes

    subs = [SubRequest(j, 0, DOC, SamplingParams()) for j in range(3)] + [
        SubRequest(3, 1, QUESTION[:100], SamplingParams())
    ]
    hashed = with_block_hashes(subs, BLOCK)
    assert [s.block_hashes for s in hashed[:3]] == [block_hash_chain(DOC, BLOCK)] * 3
    assert hashed[0].block_hashes is hashed[2].block_hashes  # one chain per prompt
    assert (
        hashed[3].block_hashes == block_hash_chain(QUESTION[:100], BLOCK) and len(hashed[3].block_hashes) == 1
    )


def test_controller_takes_the_ingress_chain_and_hashes_only_without_one():
    from types import SimpleNamespace

    from esp_serve.app.config import load_config
    from esp_serve.app.controller import ESPController
    from esp_serve.app.protocol import GenerateRequest

    def controller(cache_on: bool):
        # the two things _block_hashes reads: the config and whether the policy caches
        return SimpleNamespace(cfg=load_config({}), scheduler=SimpleNamespace(prefix_cache_enabled=cache_on))

    sent = tuple(range(10))  # not the real chain: used as sent, proving no rehash
    with_chain = GenerateRequest("r", DOC, SamplingParams(), block_hashes=sent)
    without = GenerateRequest("r", DOC, SamplingParams())
    assert ESPController._block_hashes(controller(True), with_chain) == sent
    assert ESPController._block_hashes(controller(True), without) == block_hash_chain(DOC, BLOCK)
    assert ESPController._block_hashes(controller(False), with_chain) == ()
