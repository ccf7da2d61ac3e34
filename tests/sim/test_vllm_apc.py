"""vllm-apc: vLLM's automatic prefix caching on the vllm model, and the prefix hit-rate metric.

Every run goes through the simulator, which replays each plan on its own KV ledger; the
scheduler's own cache accounting is checked before every schedule() call."""

from dataclasses import replace

import pytest

from esp_core.sched.interface import ClusterSpec
from esp_core.sim.baselines import vllm_scheduler
from esp_core.sim.baselines.block_cache import BlockCache
from esp_core.sim.baselines.vllm_apc import vllm_apc_scheduler
from esp_core.sim.metrics import prefix_hit_rate
from esp_core.sim.policies import LayoutConfig, build_scheduler, cluster_for
from esp_core.sim.prefix_workloads import chain_hashes, generate_docqa
from esp_core.sim.simulator import SimStats, Simulator, scheduler_cached_tokens
from esp_core.sim.workloads import RequestSpec, generate

B = 256


def hashes(name: int, prompt: int, block: int = B) -> tuple[int, ...]:
    return chain_hashes((name, i) for i in range(prompt // block))


def checked_run(sched, cost_model, requests):
    def check(s):
        s.check_cache_accounting()
        return lambda plan: None

    res = Simulator(sched, cost_model, plan_checker=check).run(requests)
    assert all(r.finished_ok for r in res.records)
    sched.check_cache_accounting()
    return res


def ttft(res, rid):
    rec = next(r for r in res.records if r.request_id == rid)
    return rec.first_token_s - rec.arrival_s


def test_block_cache_lru_evicts_the_deepest_block_first():
    cache = BlockCache(B)
    a, b = hashes(1, 3 * B), hashes(2, 2 * B)
    assert cache.acquire(a) == 3 * B
    assert cache.hit_blocks(a) == 0  # not computed yet
    cache.mark_computed(a)
    cache.acquire(b)
    cache.mark_computed(b)
    assert cache.release(a) == 0 and cache.evictable_slots == 3 * B
    cache.release(b)
    assert cache.evict(B) == B  # a's last block: released first, deepest first
    assert cache.hit_blocks(a) == 2 and cache.hit_blocks(b) == 2
    assert cache.evict(3 * B) == 3 * B  # a's first two, then b's deepest
    assert cache.hit_blocks(a) == 0 and cache.hit_blocks(b) == 1


def test_block_cache_drops_blocks_released_before_computed():
    cache = BlockCache(B)
    a = hashes(1, 2 * B)
    cache.acquire(a)
    assert cache.release(a) == 2 * B and cache.slots == 0


def test_a_hit_skips_prefill_time(cost_model):
    prompt = 12_000
    h = hashes(1, prompt)
    first = RequestSpec("a", 0.0, prompt, 8, h)
    second = RequestSpec("b", 30.0, prompt, 8, h)  # after a finished
    sched = vllm_apc_scheduler(ClusterSpec(1, 840_000, 8))
    res = checked_run(sched, cost_model, [first, second])
    assert ttft(res, "b") < 0.3 * ttft(res, "a")
    cached = (prompt // B) * B
    assert sched.stats["cached_prompt_tokens"] == cached
    assert res.stats.cached_prompt_tokens == cached
    assert prefix_hit_rate(res.stats) == pytest.approx(cached / (2 * prompt))
    # the same two requests without the cache: no hit, no faster second TTFT
    cold = Simulator(vllm_scheduler(ClusterSpec(1, 840_000, 8)), cost_model).run([first, second])
    assert ttft(cold, "b") == pytest.approx(ttft(cold, "a"))
    assert cold.stats.cached_prompt_tokens == 0 and prefix_hit_rate(cold.stats) == 0.0


def test_a_prompt_of_only_cached_blocks_recomputes_its_last_block(cost_model):
    h = hashes(1, 4 * B)
    reqs = [RequestSpec("a", 0.0, 4 * B, 4, h), RequestSpec("b", 10.0, 4 * B, 4, h)]
    sched = vllm_apc_scheduler(ClusterSpec(1, 100_000, 8))
    checked_run(sched, cost_model, reqs)
    assert sched.stats["cached_prompt_tokens"] == 3 * B


def test_requests_prefilled_together_do_not_hit(cost_model):
    h = hashes(1, 8 * B)
    reqs = [RequestSpec("a", 0.0, 8 * B + 10, 4, h), RequestSpec("b", 0.0, 8 * B + 20, 4, h)]
    sched = vllm_apc_scheduler(ClusterSpec(1, 100_000, 8))
    res = checked_run(sched, cost_model, reqs)
    assert res.stats.prefill_batches == 1  # one batch: neither is computed when the other starts
    assert sched.stats["cached_prompt_tokens"] == 0
    assert sched.stats["cache_slots"] == 8 * B  # one cached copy (b's own copy was freed)


def test_eviction_under_memory_pressure(cost_model):
    """A 3,000-slot pool: a second document evicts the first one's cached blocks, so the
    first document asked again hits only what survived."""
    doc1, doc2 = hashes(1, 2_000), hashes(2, 2_000)
    reqs = [
        RequestSpec("d1", 0.0, 2_000, 4, doc1),
        RequestSpec("d2", 20.0, 2_000, 4, doc2),
        RequestSpec("d1-again", 40.0, 2_000, 4, doc1),
    ]
    sched = vllm_apc_scheduler(ClusterSpec(1, 3_000, 1))
    checked_run(sched, cost_model, reqs)
    # d2 needs 7 x 256 cache slots + 208 own (+ a 30-slot watermark) with 1,208 free: 4
    # of d1's 7 cached blocks are evicted, deepest first; d1 asked again hits the other 3
    assert sched.stats["cached_prompt_tokens"] == 3 * B
    # the same with room for both documents: the whole document hits again
    roomy = vllm_apc_scheduler(ClusterSpec(1, 10_000, 1))
    checked_run(roomy, cost_model, reqs)
    assert roomy.stats["cached_prompt_tokens"] == 7 * B


def test_docqa_under_memory_pressure_finishes_everything(cost_model):
    """Evictions and recompute preemptions together; cache accounting checked throughout."""
    docs = generate_docqa(40, rate=5.0, seed=2)
    reqs = [replace(r, output_tokens=1_000) for r in docs if r.prompt_tokens < 20_000]
    sched = vllm_apc_scheduler(ClusterSpec(1, 40_000, 8))
    res = checked_run(sched, cost_model, reqs)
    assert res.stats.preemptions > 0
    assert 0 < prefix_hit_rate(res.stats) < 0.75


def test_without_hashes_vllm_apc_is_vllm(cost_model):
    """No block hashes, no cache: the very same plans and times as the calibrated vllm."""
    reqs = generate("sharegpt", 60, 30.0, seed=3)
    cluster = ClusterSpec(1, 8_000, 8)  # small: preemptions happen too
    plain = Simulator(vllm_scheduler(cluster), cost_model).run(reqs)
    apc = checked_run(vllm_apc_scheduler(cluster), cost_model, reqs)
    assert plain.stats.preemptions > 0
    assert apc.to_dict() == plain.to_dict()


def test_vllm_ignores_block_hashes(cost_model):
    """The no-cache policy gives the same result with or without hashes on the requests."""
    reqs = generate_docqa(16, rate=1.0, seed=1)
    bare = [replace(r, block_hashes=()) for r in reqs]
    layout = LayoutConfig()
    cluster = cluster_for("vllm", layout)
    with_h = Simulator(build_scheduler("vllm", cluster, cost_model, "docqa", layout), cost_model).run(reqs)
    without = Simulator(build_scheduler("vllm", cluster, cost_model, "docqa", layout), cost_model).run(bare)
    assert with_h.to_dict() == without.to_dict()


def test_hit_rate_metric():
    assert prefix_hit_rate(SimStats(prompt_tokens=1_000, cached_prompt_tokens=250)) == 0.25
    assert prefix_hit_rate(SimStats(prompt_tokens=1_000)) == 0.0


def test_cached_tokens_are_read_from_either_stats_name(cost_model):
    """`stats["cached_prompt_tokens"]` (the baselines) or `prefix_cache_stats()["hit_tokens"]`
    (the ESP scheduler's prefix cache); 0 for a scheduler without a cache."""
    cluster = ClusterSpec(1, 100_000, 8)
    assert scheduler_cached_tokens(vllm_scheduler(cluster)) == 0
    apc = vllm_apc_scheduler(cluster)
    h = hashes(1, 2 * B)
    checked_run(
        apc, cost_model, [RequestSpec("a", 0.0, 2 * B + 1, 2, h), RequestSpec("b", 9.0, 2 * B + 1, 2, h)]
    )
    assert scheduler_cached_tokens(apc) == 2 * B

    class WithPrefixCacheStats:
        stats: dict[str, int] = {"prefill_batches": 3}

        def prefix_cache_stats(self):
            return {"enabled": True, "hits": 2, "hit_tokens": 1_024}

    assert scheduler_cached_tokens(WithPrefixCacheStats()) == 1_024
