"""The prefix cache inside the scheduler: retain at finish, share or adopt on a hit, evict LRU.

* `retain`: a request that finished normally keeps its KV (positions [0, n), prompt and
  outputs) under its own id in `KVAccounting`, as a cache entry (prefix_cache.py) --
  no `Release` is emitted, so the instances keep the slots.
* `adopt_hits`: a fresh waiting request whose prompt's longest cached block prefix (k
  tokens) lies in entry E takes E's KV for [0, k) (`KVAdoption`, executed right after
  the plan's releases) and becomes a chunked prefill from position k whose holders are
  where that KV lies: the existing later-chunk path (chunked.py) attends to it there.
  E leaves the cache; the request, once finished, is a new entry for the same prefix.
  Other requests hitting E in the same call share that KV first
  (`KVAdoption(share=True)`: they refer to the same slots, `KVAccounting.share_prefix`),
  so concurrent readers of one document all skip it and its KV is held once. A slot is
  freed when its last holder (entry, reader) is released; an entry whose KV a running
  reader shares is never evicted (evicting it would free nothing of that KV).
* Shares of live requests (`note_written` indexes a running request's prompt blocks
  once their KV is written: its prefill batch completed, or it took them from the cache;
  `forget_source` drops them before its KV can go): a hit there is always a share.
  Why the source's KV is still there when the share runs: executors apply a plan's
  releases, then its adoptions in order, then migrations, then batches, and an instance
  runs the plans in order. The share is decided after this plan's `emit_releases` (a
  source is live, not DONE, so none of those releases is its), entries' evictions only
  release entries, and preemption (decode.py) never picks a request this plan shares
  from (`PlanBuilder.share_sources`); after the share, a release of the source leaves the
  shared slots to the reader. Batches never rewrite positions below what a request has
  written (they compute positions past it), so the shared [0, k) is final and nobody
  writes into it.
* No copies: a hit shares at most up to the end of the source's last shared segment or
  past it (`KVAccounting.shareable`: segments never split), and a decode group holding
  shared KV is not compacted (shared slots never migrate).
* Siblings (`NewRequest.prefill_after`, the choices of an n > 1 request): a choice
  waits until its sibling wrote every block of their prompt it could share, so the
  prompt is computed once (not once per choice, nor by a choice that started on the
  sibling's first chunk); with the sibling gone (finished, failed, aborted) it is
  admitted as usual.
* `evict_for_demand`: cached KV counts as free for admission. Each call, the oldest
  entries not shared with a running reader are released (a plain `Release`) until the
  slots outside the cache (slots several entries share counted once) cover an upper
  bound of what running and waiting requests may still need (a waiting request's prompt
  past its hit); entries waiting requests will hit go last.
"""

from __future__ import annotations

from itertools import islice

from esp_core.sched.builder import PlanBuilder
from esp_core.sched.kv_accounting import merge_ranges
from esp_core.sched.plan import KVAdoption, KVKeep, Release, ReleaseReason, TokenRange
from esp_core.sched.prefix_cache import CHAIN_SEED, CacheHit, block_hash_chain
from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import Phase, SchedulerRequest


def retain(state: SchedulerState, st: SchedulerRequest) -> bool:
    """Keep a finished request's KV as a cache entry; False when it is not worth one
    (no cache, KV not the contiguous [0, n), no whole block hashed)."""
    cache, rid = state.prefix_cache, st.rid
    if cache is None:
        return False
    held = merge_ranges(r for i in state.kv.holders(rid) for r in state.kv.ranges_on(rid, i))
    if len(held) != 1 or held[0].start != 0:
        return False
    n = held[0].end
    hashes = entry_hashes(st, n, cache.block_tokens)
    if not hashes:
        return False
    state.kv.unreserve(rid)
    cache.drop_source(rid)
    cache.insert(rid, hashes, n)
    _count_entry(state, rid, +1)
    return True


def _count_entry(state: SchedulerState, rid: str, sign: int) -> None:
    """Add (+1) or take away (-1) entry `rid`'s KV in `state.cached_per_instance`."""
    for i, n in state.kv.own_placement(rid).items():
        state.cached_per_instance[i] += sign * n


def note_written(state: SchedulerState, st: SchedulerRequest) -> None:
    """`st`'s KV of positions [0, prefilled) is written (a prefill batch of it completed,
    or it took them from the cache): its whole prompt blocks there become a share source."""
    cache = state.prefix_cache
    if cache is None or not st.req.block_hashes or st.phase == Phase.DONE:
        return
    written = min(st.prefilled, st.prompt_len)
    cache.set_source(st.rid, st.req.block_hashes[: written // cache.block_tokens])


def forget_source(state: SchedulerState, rid: str) -> None:
    """`rid`'s KV goes (finish, abort, preemption): nobody shares from it any more."""
    if state.prefix_cache is not None:
        state.prefix_cache.drop_source(rid)


def entry_hashes(st: SchedulerRequest, n: int, block_tokens: int) -> tuple[int, ...]:
    """Block hashes of positions [0, n) of a finished request: its prompt's hashes, then
    (when those cover every full prompt block: they were computed from its token ids, a
    prompt shorter than a block has none) the chain continued over the blocks that end
    in its outputs -- a later turn's prompt repeats prompt + answer."""
    hashes = st.req.block_hashes
    full = n // block_tokens
    if len(hashes) >= full or len(hashes) != st.prompt_len // block_tokens:
        return hashes[:full]  # (trace hash ids: nothing to continue the chain with)
    seq = st.req.prompt_token_ids + tuple(st.outputs)
    prev = hashes[-1] if hashes else CHAIN_SEED
    return hashes + block_hash_chain(seq[:n], block_tokens, prev, first_block=len(hashes))


def adopt_hits(state: SchedulerState, plan: PlanBuilder) -> set[str]:
    """Waiting requests (the first `max_scan`) that hit the cache take their prefix: per
    entry, every reader but the last shares it, the last adopts the entry itself; a
    reader of a live request's blocks shares them. Returns the entries shared from that
    stay cached (the plan reads them: not to be evicted by it, since releases run before
    adoptions); the live requests shared from are `plan.share_sources`."""
    cache = state.prefix_cache
    read: set[str] = set()
    state.held_for_prefix.clear()
    if cache is None:
        return read
    computing = _computing(state)
    readers: dict[str, list[tuple[SchedulerRequest, CacheHit]]] = {}
    live: list[tuple[SchedulerRequest, CacheHit]] = []  # shares of running requests
    for rid in list(islice(state.queue, state.config.max_scan)):
        st = state.requests[rid]
        if not _fresh(state, st) or _waits_for_sibling(state, st):
            continue
        if st.cache_missed_at == cache.inserts:  # (nothing indexed since its last miss)
            _hold_if_computed(state, st, computing)
            continue
        hit = _shareable(state, cache.lookup(st.req.block_hashes, st.prompt_len))
        if hit is None:
            st.cache_missed_at = cache.inserts
            _hold_if_computed(state, st, computing)
        elif hit.live:
            if not _hold_if_computed(state, st, computing, more_than=hit.tokens):
                live.append((st, hit))  # (else: its source writes more of it soon)
        else:
            readers.setdefault(hit.rid, []).append((st, hit))
    for src, hits in readers.items():
        # shortest first: each share ends a segment a longer one builds on (a shorter
        # share after a longer one would split a segment: it would wait)
        *shares, (last, last_hit) = sorted(hits, key=lambda h: h[1].tokens)
        for st, found in shares:  # (cut again: an earlier share may have made a segment)
            if (hit := _shareable(state, found)) and _fits(state, st, hit, share=True):
                _take(state, plan, st, hit, share=True)
                read.add(src)
        if (hit := _shareable(state, last_hit)) and _fits(state, last, hit, share=False):
            _take(state, plan, last, hit, share=False)
            read.discard(src)
    for st, found in live:
        if not _live_source(state, found.rid) or not (hit := _shareable(state, found)):
            continue
        if _room_for_share(state, plan, st, hit, protected=set(readers)):
            _take(state, plan, st, hit, share=True)
            plan.share_sources.add(hit.rid)
    return read


def _waits_for_sibling(state: SchedulerState, st: SchedulerRequest) -> bool:
    """A choice of an n > 1 request (`prefill_after`) is held -- not started, nothing
    looked up -- while its sibling is live and has not yet written every prompt block
    this choice could share; then it shares them all and computes only its last partial
    block. A sibling that finished (its KV a cache entry now), failed or was aborted, an
    unknown one, or one that waits for a sibling itself (no chains, so no cycles) holds
    nothing back. True: held."""
    cache = state.prefix_cache
    sibling = state.requests.get(st.req.prefill_after) if st.req.prefill_after else None
    if cache is None or sibling is None or sibling is st or sibling.phase == Phase.DONE:
        return False
    usable = min(len(st.req.block_hashes), (st.prompt_len - 1) // cache.block_tokens)
    hashes = st.req.block_hashes[:usable]
    if sibling.req.prefill_after or not hashes or sibling.req.block_hashes[:usable] != hashes:
        return False
    if cache.source_blocks(sibling.rid) >= usable:
        return False  # written: the lookup finds it
    state.held_for_prefix.add(st.rid)
    return True


def _shareable(state: SchedulerState, hit: CacheHit | None) -> CacheHit | None:
    """The hit cut to what its source can share (`KVAccounting.shareable`), or None."""
    if hit is None:
        return None
    k = state.kv.shareable(hit.rid, hit.tokens)
    return CacheHit(hit.rid, k, hit.live) if k > 0 else None


def _room_for_share(
    state: SchedulerState, plan: PlanBuilder, st: SchedulerRequest, hit: CacheHit, protected: set[str]
) -> bool:
    """`_fits` for a share of a live source, evicting the oldest entries (not those this
    plan reads or a reader shares, on idle instances) while the rest of the prompt lacks
    room in the pool: a hit now is a sure one, an entry only a possible one. Evictions
    are releases, which run before the share."""
    if _fits(state, st, hit, share=True):
        return True
    cache, kv = state.prefix_cache, state.kv
    assert cache is not None
    if not state.residents.memory_check().fits(st.remaining, _check_len_with(state, st, hit)):
        return False
    for entry in cache.entries():
        holders = kv.holders(entry.rid)
        if (
            entry.rid in protected
            or _read_by_running(state, entry.rid)
            or any(state.busy[i] is not None for i in holders)
        ):
            continue
        _evict(state, plan, entry.rid)
        if _fits(state, st, hit, share=True):
            return True
    return False


def _read_by_running(state: SchedulerState, rid: str) -> bool:
    """Entry `rid` shares KV with a running request (evicting it would free little)."""
    cache = state.prefix_cache
    assert cache is not None
    return any(h not in cache for g in state.kv.segments_of(rid) for h in g.holders)


def _evict(state: SchedulerState, plan: PlanBuilder, rid: str) -> None:
    assert state.prefix_cache is not None
    entry = state.prefix_cache.remove(rid)
    _count_entry(state, rid, -1)
    holders = state.kv.release(rid)
    state.cache_stats["evicted_tokens"] += entry.tokens
    plan.releases.append(Release(rid, holders, ReleaseReason.FINISHED))


def _computing(state: SchedulerState) -> dict[int, list[SchedulerRequest]]:
    """Requests computing their prompt now or next (prefilling, between chunks, or
    waiting in the scan), by the hash of their first block."""
    out: dict[int, list[SchedulerRequest]] = {}
    for batch in state.running.values():  # (first: they are ahead of every waiting one)
        for rid in batch.requests if batch.kind == "prefill" else ():
            st = state.requests[rid]
            if st.req.block_hashes and st.phase != Phase.DONE:
                out.setdefault(st.req.block_hashes[0], []).append(st)
    for rid in islice(state.queue, state.config.max_scan):
        st = state.requests[rid]
        if st.req.block_hashes and st.prefilled < st.prompt_len:
            out.setdefault(st.req.block_hashes[0], []).append(st)
    return out


def _hold_if_computed(
    state: SchedulerState,
    st: SchedulerRequest,
    computing: dict[int, list[SchedulerRequest]],
    more_than: int = 0,
) -> bool:
    """A request that missed (or found only `more_than` tokens) waits -- is not started
    cold, shares nothing yet -- while another request ahead of it, not held itself,
    computes at least half of its prompt and more than it found: once that KV is written
    it is a share source. The first of several such readers computes. True: held."""
    hashes, block = st.req.block_hashes, state.config.prefix_block_tokens
    usable = (st.prompt_len - 1) // block
    for other in computing.get(hashes[0], ()):
        if other is st:
            return False  # the first in line computes it
        if other.rid in state.held_for_prefix:
            continue
        shared = min(_shared_blocks(hashes, other.req.block_hashes), usable) * block
        if shared * 2 >= st.prompt_len and shared > more_than:
            state.held_for_prefix.add(st.rid)
            return True
    return False


def _shared_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Whole blocks two hash chains share (equal hashes at i: equal up to block i)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # largest n with a[n - 1] == b[n - 1]
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _live_source(state: SchedulerState, rid: str) -> bool:
    """A share source still running (the index is kept exact; this guards the plan)."""
    st = state.requests.get(rid)
    return st is not None and st.phase in (Phase.PARTIAL, Phase.DECODE)


def _fresh(state: SchedulerState, st: SchedulerRequest) -> bool:
    """Waiting with nothing computed, reserved or produced yet (not a preempted,
    resumed or already started request)."""
    return (
        st.phase == Phase.WAITING
        and bool(st.req.block_hashes)
        and st.prefilled == 0
        and not st.outputs
        and not state.kv.holders(st.rid)
        and not state.kv.reserved(st.rid)
    )


def _fits(state: SchedulerState, st: SchedulerRequest, hit: CacheHit, share: bool) -> bool:
    """The admission a chunked prompt gets at its first chunk: the peak-memory check,
    and room to reserve the positions still to compute (an adoption frees the entry's
    positions past the hit; a share needs that room beside the shared prefix)."""
    if not state.residents.memory_check().fits(st.remaining, _check_len_with(state, st, hit)):
        return False
    rest = st.prefill_target - hit.tokens
    if share:
        return state.kv.can_share_prefix(hit.rid, st.rid, hit.tokens, reserve=rest)
    return rest <= state.kv.unreserved_free + state.kv.freed_by_adopt(hit.rid, hit.tokens)


def _check_len_with(state: SchedulerState, st: SchedulerRequest, hit: CacheHit) -> int:
    """What the memory check adds for `st` taking the hit: its own positions, and the
    shared [0, k) unless a resident request's segments count it already."""
    members = state.residents.members
    counted = sum(
        g.end - g.start
        for g in state.kv.segments_of(hit.rid)
        if g.end <= hit.tokens and any(h in members for h in g.holders)
    )
    return st.prefill_target - counted


def _take(state: SchedulerState, plan: PlanBuilder, st: SchedulerRequest, hit: CacheHit, share: bool) -> None:
    """`st` takes the hit's prefix: a share (the entry stays, most recently used; a live
    source keeps running) or the entry itself (it leaves the cache). A share names the
    instances holding the source's [0, k) (a live source may hold more elsewhere)."""
    cache, kv, rid = state.prefix_cache, state.kv, st.rid
    assert cache is not None
    instances = kv.holders(hit.rid)
    if share:
        instances = tuple(sorted(kv.prefix_ranges(hit.rid, hit.tokens)))
        if not hit.live:  # (an entry's own slots may become shared ones)
            _count_entry(state, hit.rid, -1)
        kv.share_prefix(hit.rid, rid, hit.tokens)
        if not hit.live:
            _count_entry(state, hit.rid, +1)
            cache.touch(hit.rid)
    else:
        cache.remove(hit.rid)
        _count_entry(state, hit.rid, -1)
        kv.adopt(hit.rid, rid, hit.tokens)
    kept = tuple(KVKeep(i, kv.ranges_on(rid, i)) for i in kv.holders(rid))
    plan.adoptions.append(KVAdoption(hit.rid, rid, hit.tokens, instances, kept, share=share))
    kv.admit(rid, st.prefill_target - hit.tokens)
    # from here on it is a chunked prompt between chunks whose first k positions are done
    st.phase = Phase.PARTIAL
    st.prefilled = st.cached_tokens = hit.tokens
    st.wait_since = plan.now
    state.residents.add(st)
    state.residents.set_view(st, st.remaining, state.own_len(st, st.prefill_target))
    state.cache_stats["hits"] += 1
    state.cache_stats["hit_tokens"] += hit.tokens
    state.cache_stats["shared_tokens"] += hit.tokens if share else 0
    state.cache_stats["live_hits"] += hit.live
    note_written(state, st)  # its [0, k) is there once this plan's adoptions ran


def evict_for_demand(state: SchedulerState, plan: PlanBuilder, read_now: set[str]) -> None:
    """Release the oldest entries (on idle instances: releases never touch busy ones;
    not those `read_now` shares from in this plan) until the KV outside the cache covers
    the demand bound (`_demand`). Entries a waiting request will hit go last, and only
    while the requests ahead of their first reader need the room: evicting one turns a
    hit into a whole-document prefill."""
    cache, kv = state.prefix_cache, state.kv
    if cache is None or not len(cache):
        return
    total = kv.capacity * kv.num_instances
    need, wanted = _demand(state, total)
    # slots only entries hold (a document's slots count once, however many entries
    # share them; Σ entry tokens would count them per entry)
    cache_only = sum(cached_tokens_per_instance(state))
    unwanted = [e for e in cache.entries() if e.rid not in wanted]
    # a wanted entry is evicted for the demand ahead of its first reader, the one whose
    # reader comes last first
    by_reader = sorted((e for e in cache.entries() if e.rid in wanted), key=lambda e: -wanted[e.rid])
    for entry, bound in [*((e, need) for e in unwanted), *((e, wanted[e.rid]) for e in by_reader)]:
        if bound <= total - cache_only:
            continue
        holders = kv.holders(entry.rid)
        if (
            entry.rid in read_now
            or _read_by_running(state, entry.rid)
            or any(state.busy[i] is not None for i in holders)
        ):
            continue
        free_before = kv.total_free
        _evict(state, plan, entry.rid)
        cache_only -= kv.total_free - free_before


def _demand(state: SchedulerState, total: int) -> tuple[int, dict[str, int]]:
    """An upper bound of the KV running and waiting requests may hold at their peak:
    the residents' (max output budget left x count + Σ length) plus every waiting
    request's prompt past its cache hit and output budget; stops counting once past
    `total`. Also the entries waiting requests hit, each with the bound counted before
    its first reader (not counting readers held for another request's prefix)."""
    res = state.residents
    need = res.remaining_upper_bound * len(res.members) + res.total_len + state.shared_resident_slots()
    wanted: dict[str, int] = {}
    for rid in state.queue:
        if need > total:
            break
        st = state.requests[rid]
        if st.phase != Phase.WAITING:
            continue
        hit = _waiting_hit(state, st)
        # a request held for another one's prefix (a sibling, a request computing it)
        # does not start before that one: its hit keeps no entry from the room that one
        # needs (else a sibling held for a preempted sibling waits on it forever)
        if hit is not None and not hit.live and rid not in state.held_for_prefix:
            wanted.setdefault(hit.rid, need)
        need += st.prefill_target - (hit.tokens if hit else 0) + st.remaining
    return need, wanted


def _waiting_hit(state: SchedulerState, st: SchedulerRequest) -> CacheHit | None:
    """What a fresh waiting request would find in the cache now (None: a miss, or not
    fresh: its KV is counted as it is)."""
    cache = state.prefix_cache
    assert cache is not None
    if not _fresh(state, st) or st.cache_missed_at == cache.inserts:
        return None
    hit = cache.lookup(st.req.block_hashes, st.prompt_len)
    if hit is None:
        st.cache_missed_at = cache.inserts
    return hit


def cached_tokens_per_instance(state: SchedulerState) -> list[int]:
    """KV slots held by cache entries only, on each instance: their own slots, and
    shared segments no running request holds."""
    out = list(state.cached_per_instance)
    cache = state.prefix_cache
    if cache is None:
        return out
    for seg in state.kv.segments():
        if all(h in cache for h in seg.holders):
            for i in seg.ranges:
                out[i] += seg.tokens_on(i)
    return out


def _count_entries(state: SchedulerState) -> list[int]:
    """`cached_per_instance` re-derived from the entries (the invariant check)."""
    out = [0] * state.kv.num_instances
    assert state.prefix_cache is not None
    for entry in state.prefix_cache.entries():
        for i, n in state.kv.own_placement(entry.rid).items():
            out[i] += n
    return out


def check_cache_invariants(state: SchedulerState) -> None:
    """Entries are owned in KV accounting as exactly [0, tokens), by no live request,
    with no reservation; the evictable count is their sum."""
    cache = state.prefix_cache
    if cache is None:
        return
    cache.check_invariants()
    assert state.cached_per_instance == _count_entries(state), (
        state.cached_per_instance,
        _count_entries(state),
    )
    for rid, hashes in cache.sources().items():
        st = state.requests.get(rid)
        assert st is not None and st.phase != Phase.DONE, f"share source {rid} is not live"
        k = len(hashes) * cache.block_tokens
        assert k <= st.prefilled and hashes == st.req.block_hashes[: len(hashes)], rid
        held = merge_ranges(r for rs in state.kv.prefix_ranges(rid, k).values() for r in rs)
        assert held == [TokenRange(0, k)], f"share source {rid}: KV {held}, expected [0, {k})"
    for entry in cache.entries():
        rid = entry.rid
        assert rid not in state.requests, f"cache entry {rid} is also a live request"
        held = merge_ranges(r for i in state.kv.holders(rid) for r in state.kv.ranges_on(rid, i))
        assert held == [TokenRange(0, entry.tokens)], f"entry {rid}: KV {held}, expected [0, {entry.tokens})"
        assert not state.kv.reserved(rid), f"entry {rid} holds a reservation"
        assert rid not in state.pending_release and rid not in state.release_after_batch, rid
