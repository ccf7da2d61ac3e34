"""Token-slot KV pool of one instance (architecture.md §3.4).

One tensor `[layers, slots, 2, kv_heads, head_dim]` (index 0 = K after RoPE, 1 = V) and
a table request -> (slot ids, global positions). Any token of any request can take any
free slot, in any order: an instance holds an unordered subset of a request's tokens
(striped prefill, scale-down, scale-up), and since RoPE is applied before caching the
order does not matter to attention. No pages, so no rounding and no fragmentation.

Slots are reference-counted: a prefix-cache reader (`share_prefix`) lists the very slots
of its source's first positions as its own, and a slot returns to the free stack when
the last request listing it is freed. Nobody writes a shared slot again: a request only
writes positions past what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class KVPoolFullError(RuntimeError):
    """An allocation asked for more slots than are free (the scheduler over-committed)."""


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scratch_slots: int = 0,
    ) -> None:
        """`scratch_slots` extra slots past the pool's own, never allocated: where padding
        rows of a padded decode batch write their K/V (`decode_graph.py`)."""
        if num_slots < 1:
            raise ValueError("KVPool needs at least one slot")
        self.device = torch.device(device)
        self.kv = torch.zeros(
            num_layers, num_slots + scratch_slots, 2, num_kv_heads, head_dim, dtype=dtype, device=self.device
        )
        self.scratch_slots = scratch_slots
        # Free slots as a stack: allocate from the end. Reversed so the first
        # allocations get low slot ids (easier to read in debugging).
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._refs = [0] * num_slots  # slot -> requests listing it (0: free)
        self._slots: dict[str, list[int]] = {}
        self._positions: dict[str, list[int]] = {}
        self._position_set: dict[str, set[int]] = {}
        # request -> its slot ids as a device tensor with spare room at the end: a decode
        # step appends one slot in place instead of rebuilding the whole list (O(context)
        # per request per step). `slots_of` returns the first `num_tokens_of` entries.
        self._slot_tensor: dict[str, torch.Tensor] = {}  # dropped when slots are removed
        # request -> how many of its first slots it shares with another request (the first
        # slots of the source's list, listed in the same order): the bound a decode step's
        # shared-prefix grouping starts from (kernels/cascade.py)
        self._shared_len: dict[str, int] = {}

    # ----------------------------------------------------------------- capacity
    @property
    def num_total_slots(self) -> int:
        return len(self._refs)

    @property
    def scratch_slot(self) -> int:
        """The first scratch slot (its K/V is garbage, read by nobody)."""
        if not self.scratch_slots:
            raise ValueError("this KV pool has no scratch slot (scratch_slots=0)")
        return len(self._refs)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def layer(self, layer_idx: int) -> torch.Tensor:
        """KV of one layer: a view [slots, 2, kv_heads, head_dim] (what the kernels take)."""
        return self.kv[layer_idx]

    # ----------------------------------------------------------------- table
    def allocate(self, request_id: str, positions: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Give each of these global positions of `request_id` a slot; returns slot ids [n].

        Raises KVPoolFullError (allocating nothing) if fewer slots are free, and
        ValueError if a position is already stored for this request.
        """
        return torch.tensor(self.allocate_ids(request_id, positions), dtype=torch.int64, device=self.device)

    def allocate_ids(self, request_id: str, positions: Iterable[int] | torch.Tensor) -> list[int]:
        """`allocate`, returning the slot ids as host ints (for host-side bookkeeping)."""
        pos = positions.tolist() if isinstance(positions, torch.Tensor) else [int(p) for p in positions]
        n = len(pos)
        if n > len(self._free):
            raise KVPoolFullError(
                f"KV pool full: request {request_id!r} needs {n} slots, {len(self._free)} of "
                f"{self.num_total_slots} free"
            )
        seen = self._position_set.setdefault(request_id, set())
        new = set(pos)
        if len(new) != n or not seen.isdisjoint(new):
            dup = sorted((new & seen) or {p for p in pos if pos.count(p) > 1})[:5]
            if not seen:
                self._position_set.pop(request_id, None)
            raise ValueError(f"request {request_id!r}: positions {dup} already have KV slots")
        ids = self._free[len(self._free) - n :][::-1] if n else []
        del self._free[len(self._free) - n :]
        for s in ids:
            self._refs[s] = 1
        slots = self._slots.setdefault(request_id, [])
        self._append_slot_tensor(request_id, len(slots), ids)
        slots.extend(ids)
        self._positions.setdefault(request_id, []).extend(pos)
        seen |= new
        return ids

    def _append_slot_tensor(self, request_id: str, held: int, ids: list[int]) -> None:
        """Write `ids` after the `held` slots of the request's slot tensor, growing it
        (doubling) when full; a request without one gets it on its next `slots_of`."""
        buf = self._slot_tensor.get(request_id)
        if buf is None or not ids:
            return
        end = held + len(ids)
        new = torch.tensor(ids, dtype=torch.int64)
        if end > buf.numel():
            # a normal tensor even under inference_mode: later steps write into it
            with torch.inference_mode(False):
                grown = torch.empty(max(2 * buf.numel(), end), dtype=torch.int64, device=self.device)
            grown[:held] = buf[:held]
            self._slot_tensor[request_id] = buf = grown
        buf[held:end] = new.to(self.device)

    def slots_of(self, request_id: str) -> torch.Tensor:
        """Slot ids [n] int64 (on the pool's device) of every stored token of the request."""
        held = self._slots.get(request_id, [])
        buf = self._slot_tensor.get(request_id)
        if buf is None:
            with torch.inference_mode(False):  # see _append_slot_tensor
                buf = torch.tensor(held, dtype=torch.int64, device=self.device)
            if held:  # no entry for a request holding nothing (nothing would drop it)
                self._slot_tensor[request_id] = buf
        return buf[: len(held)]

    def slot_list(self, request_id: str) -> list[int]:
        """The request's slot ids as host ints (the pool's own list: do not modify)."""
        return self._slots.get(request_id, [])

    def shared_prefix_len(self, request_id: str) -> int:
        """How many of the request's first slots another request lists first too (0: none)."""
        return self._shared_len.get(request_id, 0)

    def positions_of(self, request_id: str) -> list[int]:
        """Global positions stored for the request, in the same order as `slots_of`."""
        return list(self._positions.get(request_id, []))

    def num_tokens_of(self, request_id: str) -> int:
        return len(self._slots.get(request_id, ()))

    def free(self, request_id: str) -> int:
        """Let go of every slot of the request (each returns to the pool when no other
        request lists it); returns how many the request held."""
        ids = self._slots.pop(request_id, [])
        self._positions.pop(request_id, None)
        self._position_set.pop(request_id, None)
        self._slot_tensor.pop(request_id, None)
        self._shared_len.pop(request_id, None)
        self._let_go(ids)
        return len(ids)

    def _let_go(self, ids: Iterable[int]) -> None:
        for s in ids:
            self._refs[s] -= 1
            if self._refs[s] == 0:
                self._free.append(s)

    def free_positions(self, request_id: str, positions: Iterable[int]) -> int:
        """Free some positions of a request (migration source); returns how many were freed."""
        drop = set(int(p) for p in positions)
        slots, pos = self._slots.get(request_id, []), self._positions.get(request_id, [])
        keep_s, keep_p, freed = [], [], []
        for s, p in zip(slots, pos):
            (freed if p in drop else keep_s).append(s)
            if p not in drop:
                keep_p.append(p)
        if not keep_s:
            return self.free(request_id)
        self._slots[request_id], self._positions[request_id] = keep_s, keep_p
        self._position_set[request_id] = set(keep_p)
        self._slot_tensor.pop(request_id, None)
        self._shared_len.pop(request_id, None)
        self._let_go(freed)
        return len(freed)

    def adopt(self, src: str, dst: str, keep_len: int) -> int:
        """Prefix-cache hit: `dst` (holding nothing here yet) takes `src`'s slots of
        positions < keep_len as they are (no copy); `src`'s other slots are freed and it
        is gone. Returns how many slots `dst` took."""
        if self._slots.get(dst):
            raise ValueError(f"adopt into {dst!r}: it already holds KV slots")
        slots, pos = self._slots.pop(src, []), self._positions.pop(src, [])
        self._position_set.pop(src, None)
        self._slot_tensor.pop(src, None)
        self._slot_tensor.pop(dst, None)
        keep = [(s, p) for s, p in zip(slots, pos) if p < keep_len]
        self._let_go(s for s, p in zip(slots, pos) if p >= keep_len)
        head = self._shared_len.pop(src, 0)
        if head and all(p < keep_len for p in pos[:head]):  # the shared head is kept whole
            self._shared_len[dst] = head
        if keep:
            self._slots[dst] = [s for s, _ in keep]
            self._positions[dst] = [p for _, p in keep]
            self._position_set[dst] = {p for _, p in keep}
        return len(keep)

    def share_prefix(self, src: str, dst: str, keep_len: int) -> int:
        """A reader of a prefix-cache entry or running request: `dst` (holding nothing
        here yet) lists `src`'s slots of positions < keep_len as its own (no copy); `src`
        is unchanged. Returns how many slots are shared."""
        if self._slots.get(dst):
            raise ValueError(f"share into {dst!r}: it already holds KV slots")
        pairs = [
            (s, p) for s, p in zip(self._slots.get(src, []), self._positions.get(src, [])) if p < keep_len
        ]
        if not pairs:
            return 0
        for s, _ in pairs:
            self._refs[s] += 1
        self._slots[dst] = [s for s, _ in pairs]
        self._positions[dst] = [p for _, p in pairs]
        self._position_set[dst] = {p for _, p in pairs}
        self._slot_tensor.pop(dst, None)
        n = len(pairs)
        if self._slots[src][:n] == self._slots[dst]:  # src's list starts with them
            self._shared_len[dst] = n
            self._shared_len[src] = max(self._shared_len.get(src, 0), n)
        return n

    def requests(self) -> list[str]:
        """Requests holding at least one slot."""
        return [r for r, s in self._slots.items() if s]

    def check_invariants(self) -> None:
        """Every slot is either free or listed by as many (request, position) entries as
        its reference count, never twice by one request."""
        listed = [0] * self.num_total_slots
        for r, ids in self._slots.items():
            assert len(ids) == len(set(ids)), f"{r} lists a slot twice"
            assert len(ids) == len(self._positions[r]) == len(self._position_set[r]), r
            for s in ids:
                listed[s] += 1
            assert self.slots_of(r).tolist() == ids, f"{r}: slot tensor differs from its slot list"
        assert listed == self._refs, "reference counts do not match the requests' slots"
        assert len(self._free) == len(set(self._free)), "a slot is free twice"
        assert sorted(self._free) == [s for s, n in enumerate(listed) if n == 0], "free list mismatch"
