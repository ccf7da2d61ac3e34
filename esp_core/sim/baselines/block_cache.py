"""A block-granular prefix cache as vLLM's automatic prefix caching keeps it (v0.4+).

Each cached block is `block_tokens` KV slots holding the block of prompt tokens named by
its chained hash (`NewRequest.block_hashes`). Requests reference the blocks of their
prompt; a block nobody references stays cached (its slots still hold its KV) and is
*evictable*: it counts as free memory and is reclaimed, least recently released first,
when slots are needed. Among blocks released at the same time the deepest of a chain is
evicted first (vLLM's evictor breaks last-access ties by the most hashed tokens), so a
chain shrinks from its end and the prefix that remains stays usable.

A block is *computed* once the prefill that writes it has finished; only computed blocks
are hits (vLLM shares a block that is still being written, but recomputes it). A block
released before it was computed is dropped at once: its slots hold nothing useful.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class CachedBlock:
    refs: int = 0
    computed: bool = False


class BlockCache:
    def __init__(self, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self.blocks: dict[int, CachedBlock] = {}
        # unreferenced computed blocks, least recently released first
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def slots(self) -> int:
        """Slots held by cached blocks, referenced or not."""
        return len(self.blocks) * self.block_tokens

    @property
    def evictable_slots(self) -> int:
        return len(self._evictable) * self.block_tokens

    def hit_blocks(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` that are cached and computed."""
        n = 0
        for h in hashes:
            b = self.blocks.get(h)
            if b is None or not b.computed:
                break
            n += 1
        return n

    def pinned_evictable(self, hashes: Sequence[int]) -> int:
        """Slots of `hashes` that are evictable now (acquiring them makes them unevictable)."""
        return sum(self.block_tokens for h in set(hashes) if h in self._evictable)

    def new_blocks(self, hashes: Sequence[int]) -> int:
        """Blocks of `hashes` not cached (acquiring them needs fresh slots)."""
        return len({h for h in hashes if h not in self.blocks})

    def acquire(self, hashes: Sequence[int]) -> int:
        """Reference every block of `hashes`, creating the missing ones; returns the slots
        newly taken (the caller must have made room)."""
        created = 0
        for h in hashes:
            b = self.blocks.get(h)
            if b is None:
                b = self.blocks[h] = CachedBlock()
                created += self.block_tokens
            b.refs += 1
            self._evictable.pop(h, None)
        return created

    def mark_computed(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self.blocks[h].computed = True

    def release(self, hashes: Sequence[int]) -> int:
        """Drop one reference of each block of `hashes`; returns the slots freed at once
        (blocks released before they were computed)."""
        freed = 0
        for h in reversed(hashes):  # deepest first: evicted first among equals
            b = self.blocks[h]
            b.refs -= 1
            if b.refs > 0:
                continue
            if b.computed:
                self._evictable[h] = None
            else:
                del self.blocks[h]
                freed += self.block_tokens
        return freed

    def evict(self, slots: int) -> int:
        """Evict least recently released blocks until `slots` are freed (or none is left);
        returns the slots freed."""
        freed = 0
        while freed < slots and self._evictable:
            h, _ = self._evictable.popitem(last=False)
            del self.blocks[h]
            freed += self.block_tokens
        return freed
