"""`vllm-apc`: the `vllm` model (vllm.py) with automatic prefix caching (`--enable-prefix-caching`).

vLLM 0.3, which the paper ran, has no automatic prefix caching; 0.4 added it. This policy
is the calibrated 0.3 model (same scheduling, padding, engine timing) with 0.4's cache on
top, so that the only difference from `vllm` is the cache:

* the full blocks of a prompt are cache blocks (block_cache.py) keyed by the request's
  `block_hashes`; a request references its blocks while it lives; at its end they stay
  cached and become evictable (LRU). Cached blocks count as free memory: admission and
  decode growth evict them before preempting anyone;
* a new request whose leading blocks are cached and computed skips their prefill: its
  prefill covers positions [k, n) and attends to the k cached tokens (the cost model's
  chunk-to-prefix attention, at vLLM's attention slowdown). At least one prompt token is
  always computed (to sample from), so a prompt made only of cached blocks recomputes its
  last block. Only computed blocks hit. A request that computes a block already cached
  (two requests with one prefix prefilled together, that recomputed last block) keeps
  its own copy, where vLLM would write into the shared block: slightly more memory than
  vLLM in that case, and the simulator's per-request KV ledger stays exact;
* hits are at the granularity of the hashes (`block_tokens`, 256 by default, 512 in
  Mooncake traces), not vLLM's 16-token blocks: a document's last partial hash block is
  recomputed. The rest of a request (prompt tail past its last full block, outputs)
  lives in its own 16-token blocks as in `vllm`.

The simulator's KV ledger records only what each request computed (positions [k, ...));
the cache's blocks are this scheduler's own accounting (tests check it never exceeds the
pool), and the simulator counts the k shared tokens in the request's decode attention
reads (`shared_prefix_reads`).
"""

from __future__ import annotations

from dataclasses import replace

from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import PrefillItem, ReleaseReason
from esp_core.sim.baselines.block_cache import BlockCache
from esp_core.sim.baselines.common import Req
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler, _Group
from esp_core.sim.baselines.vllm import VLLM_CONFIG

DEFAULT_BLOCK_TOKENS = 256


class VLLMPrefixCachingScheduler(StaticGroupScheduler):
    #: a prefill may start past the KV the request holds: the gap is cached prefix it reads
    shared_prefix_reads = True

    def __init__(
        self,
        cluster: ClusterSpec,
        config: StaticConfig = VLLM_CONFIG,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
    ) -> None:
        if config.admission != "paged" or config.chunk_size is not None:
            raise ValueError("prefix caching is modelled on vLLM's paged, unchunked scheduler")
        super().__init__(cluster, config)
        self.caches = [BlockCache(block_tokens) for _ in self.groups]
        self._held: dict[str, tuple[int, ...]] = {}  # request -> cache blocks it references
        self._hit: dict[str, int] = {}  # request -> cached tokens its next prefill skips
        self._in_cache: dict[str, int] = {}  # request -> its computed tokens living in cache blocks
        self._cached_prompt_tokens = 0
        self._prompt_tokens = 0

    @property
    def stats(self) -> dict[str, int]:
        return {
            "cached_prompt_tokens": self._cached_prompt_tokens,
            "prompt_tokens": self._prompt_tokens,
            "cache_slots": sum(c.slots for c in self.caches),
        }

    def check_cache_accounting(self) -> None:
        """Slots in use = live requests' own blocks + cached blocks, within the pool; every
        cache reference belongs to a live request."""
        cap = self.cluster.kv_slots_per_instance
        for grp, cache in zip(self.groups, self.caches):
            inst = grp.instances[0]
            own = sum(sum(r.alloc.values()) for r in self.reqs.values() if r.group == grp.index)
            assert self._used[inst] == own + cache.slots, (self._used[inst], own, cache.slots)
            assert 0 <= self._used[inst] <= cap, f"instance {inst} over-committed: {self._used[inst]}"
            refs = sum(b.refs for b in cache.blocks.values())
            held = sum(len(h) for rid, h in self._held.items() if self.reqs[rid].group == grp.index)
            assert refs == held, (refs, held)

    # -- memory ------------------------------------------------------------------------

    def _hashes(self, req: Req, cache: BlockCache) -> tuple[int, ...]:
        return req.new.block_hashes[: req.prompt_len // cache.block_tokens]

    def _own_tokens(self, req: Req) -> int:
        """KV tokens of `req` in its own blocks (not in cache blocks)."""
        return req.kv_tokens - self._in_cache.get(req.rid, 0)

    def _grow(self, req: Req, inst: int, n: int) -> None:
        req.kv[inst] = req.kv.get(inst, 0) + n
        need = self._blocks(req.kv[inst] - self._in_cache.get(req.rid, 0))
        have = req.alloc.get(inst, 0)
        if need > have:
            req.alloc[inst] = need
            self._used[inst] += need - have

    def _evict(self, grp: _Group, want_free: int) -> None:
        """Evict cached blocks until `want_free` slots are free (or nothing is evictable)."""
        inst = grp.instances[0]
        short = want_free - self._free(inst)
        if short > 0:
            self._used[inst] -= self.caches[grp.index].evict(short)

    # -- admission and prefill ---------------------------------------------------------

    def _admit_paged(self, grp: _Group, picked_slots: int, cand: Req) -> bool:
        """Admit when the new blocks (cache misses + own blocks) fit in free + evictable
        slots; then reference the hit blocks, evict for the rest and take it. Slots are
        taken here, so `picked_slots` (the base's running count) is not needed."""
        cache, inst = self.caches[grp.index], grp.instances[0]
        hashes = self._hashes(cand, cache)
        bt = cache.block_tokens
        hit = cache.hit_blocks(hashes)
        if hit * bt >= cand.prefill_target:
            hit -= 1  # compute at least one token: there must be logits to sample
        fresh = [h for h in hashes[hit:] if h not in cache.blocks]
        # the request's own blocks: the prompt tail, recomputed outputs, and a private copy
        # of any block it computes that is already cached (see the module docstring)
        own = self._blocks(cand.prefill_target - (hit + len(fresh)) * bt)
        need = len(fresh) * bt + own
        watermark = int(self.cluster.kv_slots_per_instance * self.config.watermark)
        room = self._free(inst) + cache.evictable_slots - cache.pinned_evictable(hashes[:hit])
        if need + watermark > room:
            return False
        cache.acquire(hashes[:hit])  # pinned: not evicted below
        self._evict(grp, need + watermark)
        self._used[inst] += cache.acquire(fresh) + own
        cand.alloc[inst] = own
        self._held[cand.rid] = (*hashes[:hit], *fresh)
        self._hit[cand.rid] = hit * bt
        self._in_cache[cand.rid] = len(fresh) * bt
        if not cand.outputs:  # first prefill: what the user sees as cached tokens
            self._cached_prompt_tokens += hit * bt
            self._prompt_tokens += cand.prompt_len
        return True

    def _prefill_item(
        self, req: Req, start: int, end: int, ring: tuple[int, ...], keep: list[tuple[int, int]]
    ) -> PrefillItem:
        k = self._hit.pop(req.rid, 0) if start == 0 else 0
        if not k:
            return super()._prefill_item(req, start, end, ring, keep)
        item = super()._prefill_item(req, k, end, ring, [(ring[0], end - k)])
        return replace(item, cached_holders=ring)  # the cached prefix lies on the replica

    def _after_prefill(self, req: Req, sampled: bool) -> None:
        if sampled:
            self.caches[req.group].mark_computed(self._held.get(req.rid, ()))
        super()._after_prefill(req, sampled)

    def _drop_kv(self, req: Req, reason: ReleaseReason) -> None:
        """Own blocks are freed; cache blocks lose a reference and stay cached."""
        super()._drop_kv(req, reason)
        hashes = self._held.pop(req.rid, ())
        if hashes:
            grp = self.groups[req.group]
            self._used[grp.instances[0]] -= self.caches[grp.index].release(hashes)
        self._in_cache.pop(req.rid, None)
        self._hit.pop(req.rid, None)

    # -- decode ------------------------------------------------------------------------

    @property
    def block_tokens(self) -> int:
        return self.caches[0].block_tokens

    def decode_cache_blocks(self, request_id: str) -> tuple[int, ...]:
        """Cache blocks `request_id` reads: its hit blocks and the fresh ones it wrote.
        Readers of one block read the same slots: the simulator's cascade timing counts a
        block once per decode step (vLLM's cascade attention; timing.py)."""
        return self._held.get(request_id, ())

    def _preempt_for_decode(self, grp: _Group) -> None:
        """Every running request needs a slot for its next token: evict cached blocks
        first, then preempt the latest arrival (vLLM's order)."""

        def need() -> int:
            return sum(
                self.block_size for r in grp.running if self._own_tokens(r) + 1 > sum(r.alloc.values())
            )

        while grp.running:
            want = need()
            self._evict(grp, want)
            if want <= self._group_free(grp):
                return
            self._preempt(grp, grp.running.pop())


def vllm_apc_scheduler(
    cluster: ClusterSpec, block_tokens: int = DEFAULT_BLOCK_TOKENS
) -> VLLMPrefixCachingScheduler:
    return VLLMPrefixCachingScheduler(cluster, VLLM_CONFIG, block_tokens)
