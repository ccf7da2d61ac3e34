"""The prefix cache's index: finished requests' KV kept as evictable entries.

A finished request's KV is not released: it stays in `KVAccounting` under the finished
request's id, and an entry here says which prompt blocks it covers. Blocks are the
prompt's full blocks of `block_tokens` tokens, named by a hash chain
(`block_hash_chain`: h_i = BLAKE2b(h_{i-1}, tokens of block i), 128 bits), so equal hashes at index i
mean equal token sequences up to the end of block i.

A new request whose longest cached block prefix (k tokens, whole blocks) matches entry E
adopts E's KV for positions [0, k) (`KVAdoption` in the plan): E leaves the cache and the
request continues as a chunked prefill from position k (cache_ops.py). Other requests
hitting E in the same plan share that KV first. Entries are evicted least
recently used first when their slots are needed.

Share sources: a live request's prompt blocks whose KV is written (its prefill of them
completed, or it took them from the cache) are indexed too, under its own id; a hit
there (`CacheHit.live`) is always a share -- the source keeps running. A request that
adopted an entry is such a source, so the prefix stays reachable while it runs.

Pure Python: the controller hashes token ids with `block_hash_chain`, the simulator
passes trace hash ids instead.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

CHAIN_SEED = 0x5EED  # h_{-1}: the chain's start (any constant; both sides use this one)
MASK_128 = (1 << 128) - 1  # a chain may continue from a trace's own (any-size) hash id


def block_hash_chain(
    token_ids: Sequence[int], block_tokens: int, prev: int = CHAIN_SEED, first_block: int = 0
) -> tuple[int, ...]:
    """Hashes of the full blocks of `token_ids` from block `first_block` on, chained from
    `prev` (the hash of block `first_block - 1`).

    128-bit BLAKE2b over (previous hash, the block's ids as little-endian uint32): a hit
    hands one client's KV to another's prompt, so a collision must not be something a
    client can construct (Python's own `hash` of a tuple of ints can be, cheaply). Same in
    every process; ~1 us per 64-token block."""
    ids = array("I", token_ids)  # uint32: raises on ids outside [0, 2**32)
    if sys.byteorder != "little":
        ids.byteswap()
    raw = ids.tobytes()
    width = block_tokens * ids.itemsize
    out = []
    for b in range(first_block, len(ids) // block_tokens):
        h = blake2b((prev & MASK_128).to_bytes(16, "little"), digest_size=16)
        h.update(raw[b * width : (b + 1) * width])
        prev = int.from_bytes(h.digest(), "little")
        out.append(prev)
    return tuple(out)


@dataclass(frozen=True)
class CacheEntry:
    """KV of finished request `rid` for positions [0, tokens), whose full blocks hash to
    `hashes` (len(hashes) == tokens // block_tokens)."""

    rid: str
    hashes: tuple[int, ...]
    tokens: int


@dataclass(frozen=True)
class CacheHit:
    rid: str  # the entry whose KV is adopted (or the live request shared from)
    tokens: int  # k: positions [0, k) adopted, whole blocks
    live: bool = False  # a share source (a running request), not an entry


class PrefixCache:
    def __init__(self, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # oldest first
        self._index: dict[int, str] = {}  # block hash -> entry rid (the newest with it)
        self.cached_tokens = 0  # Σ entry tokens: KV that eviction can free
        self.inserts = 0  # entries/sources ever indexed: a request that missed looks again after one
        self._sources: dict[str, tuple[int, ...]] = {}  # live request -> its written prompt blocks
        self._source_index: dict[int, str] = {}  # block hash -> source rid (the newest with it)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rid: object) -> bool:
        return rid in self._entries

    @property
    def indexed(self) -> bool:
        """Anything to look up: entries or share sources."""
        return bool(self._entries or self._sources)

    def entries(self) -> list[CacheEntry]:
        """Oldest first (eviction order)."""
        return list(self._entries.values())

    def insert(self, rid: str, hashes: Sequence[int], tokens: int) -> CacheEntry:
        usable = tuple(hashes[: tokens // self.block_tokens])
        if rid in self._entries:
            raise ValueError(f"cache entry {rid!r} exists")
        entry = CacheEntry(rid, usable, tokens)
        self._entries[rid] = entry
        self.inserts += 1
        self.cached_tokens += tokens
        for h in usable:
            self._index[h] = rid
        return entry

    def touch(self, rid: str) -> None:
        """Just read: last in eviction order."""
        self._entries.move_to_end(rid)

    def remove(self, rid: str) -> CacheEntry:
        entry = self._entries.pop(rid)
        self.cached_tokens -= entry.tokens
        for h in entry.hashes:
            if self._index.get(h) == rid:
                del self._index[h]
        return entry

    def set_source(self, rid: str, hashes: Sequence[int]) -> None:
        """Index a live request's written prompt blocks (a longer list replaces a shorter)."""
        have = self._sources.get(rid, ())
        if len(hashes) <= len(have):
            return
        self._sources[rid] = tuple(hashes)
        self.inserts += 1
        for h in hashes[len(have) :]:
            self._source_index[h] = rid

    def drop_source(self, rid: str) -> None:
        """The request's KV is about to go (finish, abort, preemption): no longer a source."""
        for h in self._sources.pop(rid, ()):
            if self._source_index.get(h) == rid:
                del self._source_index[h]

    def source_blocks(self, rid: str) -> int:
        """How many of live request `rid`'s prompt blocks are written and indexed."""
        return len(self._sources.get(rid, ()))

    def sources(self) -> dict[str, tuple[int, ...]]:
        return dict(self._sources)

    def lookup(self, hashes: Sequence[int], prompt_len: int) -> CacheHit | None:
        """The longest cached whole-block prefix of a prompt, leaving at least one prompt
        token to compute (its logits give the first output token); an entry before a
        live source of the same length (adopting it leaves no second holder)."""
        usable = min(len(hashes), (prompt_len - 1) // self.block_tokens)
        for i in range(usable - 1, -1, -1):
            rid = self._index.get(hashes[i])
            if rid is not None:
                return CacheHit(rid, (i + 1) * self.block_tokens)
            rid = self._source_index.get(hashes[i])
            if rid is not None:
                return CacheHit(rid, (i + 1) * self.block_tokens, live=True)
        return None

    def check_invariants(self) -> None:
        total = 0
        for rid, e in self._entries.items():
            assert e.rid == rid and len(e.hashes) <= e.tokens // self.block_tokens, e
            total += e.tokens
        assert total == self.cached_tokens, f"cached tokens {self.cached_tokens} != {total}"
        for h, rid in self._index.items():
            assert rid in self._entries and h in self._entries[rid].hashes, (h, rid)
        for h, rid in self._source_index.items():
            assert rid in self._sources and h in self._sources[rid], (h, rid)
        assert not set(self._sources) & set(self._entries), "a request is both a source and an entry"
