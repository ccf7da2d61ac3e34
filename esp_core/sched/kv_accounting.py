"""The scheduler's global view of KV slots: per instance, per request, per token range.

Every instance has a token-slot pool of `capacity` slots (docs/architecture.md): any token of any
request can live in any slot, so the only things to count are slots per instance and,
per request, which global positions each instance holds (needed for holders, scale-down
keeps, migrations and releases).

Operations come in check-then-act pairs that never over-commit:

* `can_admit(n)` / `admit(rid, n)`: reserve n slots *somewhere* for a request whose
  tokens are not placed yet (e.g. the rest of a chunked prompt). Reservations are
  global: they make sure the slots exist, placement picks the instances later.
* `can_place(rid, inst, n)` / `place(rid, inst, ranges)`: commit slots on one instance
  (a prefill's keep ranges, a decode step's new token). Placing consumes the request's
  own reservation first and never eats into other requests' reservations.
* `release(rid)` frees everything a request holds (finish, abort, preemption);
  `move(rid, src, dst, ranges)` is a migration.
* `adopt(src, dst, keep_len)` is a prefix-cache hit: `dst` takes `src`'s slots of
  positions [0, keep_len) where they lie, the rest of `src` is freed.

Slots are committed when a plan is *emitted* (the executor writes them when the batch
runs) and freed when the release is emitted (releases run before batches in a plan).
`check_invariants()` re-derives every counter from the per-request ranges.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from esp_core.sched.plan import TokenRange


class KVOvercommit(RuntimeError):
    """An act (`admit`, `place`, `move`) without a successful check: a scheduler bug."""


def merge_ranges(ranges: Iterable[TokenRange]) -> list[TokenRange]:
    """Sorted, coalesced copy of `ranges` (overlaps are a caller bug and raise)."""
    out: list[TokenRange] = []
    for r in sorted(ranges):
        if len(r) == 0:
            continue
        if out and r.start < out[-1].end:
            raise ValueError(f"overlapping KV ranges {out[-1]} and {r}")
        if out and r.start == out[-1].end:
            out[-1] = TokenRange(out[-1].start, r.end)
        else:
            out.append(r)
    return out


def subtract_ranges(have: list[TokenRange], remove: Iterable[TokenRange]) -> list[TokenRange]:
    """`have` minus `remove`; every removed position must be in `have`."""
    out = list(have)
    for r in remove:
        nxt: list[TokenRange] = []
        found = 0
        for h in out:
            inter = h.intersect(r)
            if inter is None:
                nxt.append(h)
                continue
            found += len(inter)
            if h.start < inter.start:
                nxt.append(TokenRange(h.start, inter.start))
            if inter.end < h.end:
                nxt.append(TokenRange(inter.end, h.end))
        if found != len(r):
            raise ValueError(f"range {r} is not fully held")
        out = nxt
    return merge_ranges(out)


class KVAccounting:
    def __init__(self, num_instances: int, capacity: int) -> None:
        self.num_instances = num_instances
        self.capacity = capacity
        self.used = np.zeros(num_instances, dtype=np.int64)  # [instances]
        # Σ used, kept beside `used` so the check-then-act calls (several per planned
        # token range) do not sum the array each time; `check_invariants` re-derives it
        self._used_total = 0
        self._ranges: dict[str, dict[int, list[TokenRange]]] = {}  # rid -> inst -> ranges
        self._reserved: dict[str, int] = {}
        self.total_reserved = 0

    # ------------------------------------------------------------------ queries

    @property
    def free(self) -> np.ndarray:
        """Free slots per instance (ignoring global reservations). [instances]"""
        return self.capacity - self.used

    def free_slots(self) -> list[int]:
        return [int(x) for x in self.free]

    @property
    def total_free(self) -> int:
        return self.capacity * self.num_instances - self._used_total

    @property
    def unreserved_free(self) -> int:
        return self.total_free - self.total_reserved

    def reserved(self, rid: str) -> int:
        return self._reserved.get(rid, 0)

    def holders(self, rid: str) -> tuple[int, ...]:
        """Instances holding KV of `rid`, ascending."""
        return tuple(sorted(self._ranges.get(rid, {})))

    def tokens_on(self, rid: str, inst: int) -> int:
        return sum(len(r) for r in self._ranges.get(rid, {}).get(inst, ()))

    def tokens_of(self, rid: str) -> int:
        return sum(len(r) for rs in self._ranges.get(rid, {}).values() for r in rs)

    def ranges_on(self, rid: str, inst: int) -> tuple[TokenRange, ...]:
        return tuple(self._ranges.get(rid, {}).get(inst, ()))

    def placement(self, rid: str) -> dict[int, int]:
        """inst -> tokens of `rid` held there."""
        return {i: sum(len(r) for r in rs) for i, rs in self._ranges.get(rid, {}).items()}

    def requests(self) -> list[str]:
        return list(self._ranges)

    # ------------------------------------------------------------------ admit / reserve

    def can_admit(self, n: int) -> bool:
        return n >= 0 and n <= self.unreserved_free

    def admit(self, rid: str, n: int) -> None:
        """Reserve `n` more slots for `rid` somewhere in the pool."""
        if not self.can_admit(n):
            raise KVOvercommit(f"admit {rid}: {n} slots, only {self.unreserved_free} unreserved")
        self._reserved[rid] = self._reserved.get(rid, 0) + n
        self.total_reserved += n

    def unreserve(self, rid: str, n: int | None = None) -> None:
        """Return (part of) a reservation, e.g. when a chunked request is preempted."""
        have = self._reserved.get(rid, 0)
        n = have if n is None else min(n, have)
        if n <= 0:
            return
        self.total_reserved -= n
        if have - n:
            self._reserved[rid] = have - n
        else:
            self._reserved.pop(rid, None)

    # ------------------------------------------------------------------ place

    def can_place(self, rid: str, inst: int, n: int) -> bool:
        """Room for `n` slots of `rid` on `inst` without eating others' reservations."""
        if n < 0 or not (0 <= inst < self.num_instances):
            return False
        if self.used[inst] + n > self.capacity:
            return False
        own = min(self._reserved.get(rid, 0), n)
        # after placing, the pool must still hold everyone else's reservation
        return self.total_free - n >= self.total_reserved - own

    def place(self, rid: str, inst: int, ranges: Iterable[TokenRange]) -> None:
        ranges = [r for r in ranges if r.end > r.start]
        n = sum(r.end - r.start for r in ranges)
        if not self.can_place(rid, inst, n):
            raise KVOvercommit(
                f"place {rid}: {n} slots on instance {inst} "
                f"(free {int(self.free[inst])}, reserved {self.total_reserved})"
            )
        per_inst = self._ranges.setdefault(rid, {})
        held_end = max((have[-1].end for have in per_inst.values() if have), default=0)
        if len(ranges) == 1 and ranges[0].start >= held_end:
            # the usual case -- a prefill keep, a chunk's keep, a decode token: one range
            # past everything the request holds, appended (merged with the last range
            # here when adjacent) without the general path's scans; twice as fast
            r, have = ranges[0], per_inst.get(inst)
            if have and r.start == have[-1].end:
                have[-1] = TokenRange(have[-1].start, r.end)
            elif have:
                have.append(r)
            else:
                per_inst[inst] = [r]
        else:
            # positions must be new for the request (no duplicate KV anywhere)
            for other, held in per_inst.items():
                for r in ranges:
                    for h in held:
                        if h.intersect(r) is not None:
                            raise ValueError(f"{rid}: positions {r} already held on {other}")
            per_inst[inst] = merge_ranges([*per_inst.get(inst, ()), *ranges])
        self.used[inst] += n
        self._used_total += n
        self.unreserve(rid, n)

    # ------------------------------------------------------------------ release / move

    def release(self, rid: str) -> tuple[int, ...]:
        """Free every slot and reservation of `rid`; returns the instances it was on."""
        self.unreserve(rid)
        per_inst = self._ranges.pop(rid, {})
        for inst, rs in per_inst.items():
            n = sum(len(r) for r in rs)
            self.used[inst] -= n
            self._used_total -= n
        return tuple(sorted(per_inst))

    def adopt(self, src: str, dst: str, keep_len: int) -> tuple[int, ...]:
        """`dst` (holding nothing yet) takes `src`'s positions [0, keep_len), on the
        instances that hold them; `src` is gone afterwards. Returns `src`'s instances
        (every one of them applies the adoption: renames or frees)."""
        if self._ranges.get(dst):
            raise ValueError(f"adopt into {dst}: it already holds KV")
        per_inst = self._ranges.get(src, {})
        keep = TokenRange(0, keep_len)
        taken = {
            inst: kept
            for inst, rs in per_inst.items()
            if (kept := [x for r in rs if (x := r.intersect(keep)) is not None])
        }
        if sum(len(r) for rs in taken.values() for r in rs) != keep_len:
            raise ValueError(f"adopt {src} -> {dst}: {src} does not hold all of [0, {keep_len})")
        for inst, rs in per_inst.items():
            freed = sum(len(r) for r in rs) - sum(len(r) for r in taken.get(inst, ()))
            self.used[inst] -= freed
            self._used_total -= freed
        del self._ranges[src]
        self._ranges[dst] = taken
        self.unreserve(src)
        return tuple(sorted(per_inst))

    def prefix_ranges(self, rid: str, keep_len: int) -> dict[int, list[TokenRange]]:
        """inst -> `rid`'s ranges below `keep_len` there (instances holding some)."""
        keep = TokenRange(0, keep_len)
        return {
            inst: cut
            for inst, rs in self._ranges.get(rid, {}).items()
            if (cut := [x for r in rs if (x := r.intersect(keep)) is not None])
        }

    def can_copy_prefix(self, src: str, dst: str, keep_len: int, reserve: int = 0) -> bool:
        """Room for a copy of `src`'s positions [0, keep_len) next to them, plus `reserve`
        more slots for `dst`, without eating others' reservations."""
        per_inst = self.prefix_ranges(src, keep_len)
        if sum(len(r) for rs in per_inst.values() for r in rs) != keep_len or self._ranges.get(dst):
            return False
        fits = all(self.used[i] + sum(len(r) for r in rs) <= self.capacity for i, rs in per_inst.items())
        return fits and keep_len + reserve <= self.unreserved_free

    def copy_prefix(self, src: str, dst: str, keep_len: int) -> None:
        """`dst` gets its own slots for `src`'s positions [0, keep_len), on the same
        instances (a second reader of a prefix-cache entry); `src` keeps its KV."""
        if not self.can_copy_prefix(src, dst, keep_len):
            raise KVOvercommit(f"copy of {src}'s first {keep_len} positions to {dst}: no room")
        for inst, rs in self.prefix_ranges(src, keep_len).items():
            self.place(dst, inst, rs)

    def can_move(self, rid: str, dst: int, n: int) -> bool:
        return self.used[dst] + n <= self.capacity

    def move(self, rid: str, src: int, dst: int, ranges: Iterable[TokenRange]) -> None:
        ranges = list(ranges)
        n = sum(len(r) for r in ranges)
        if src == dst:
            raise ValueError("migration to the same instance")
        if not self.can_move(rid, dst, n):
            raise KVOvercommit(f"move {rid}: {n} slots to full instance {dst}")
        per_inst = self._ranges.get(rid, {})
        left = subtract_ranges(per_inst.get(src, []), ranges)
        if left:
            per_inst[src] = left
        else:
            per_inst.pop(src, None)
        per_inst[dst] = merge_ranges([*per_inst.get(dst, ()), *ranges])
        self.used[src] -= n
        self.used[dst] += n

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        used = np.zeros(self.num_instances, dtype=np.int64)
        for rid, per_inst in self._ranges.items():
            seen: list[TokenRange] = []
            for inst, rs in per_inst.items():
                assert rs, f"{rid}: empty range list kept on {inst}"
                assert rs == merge_ranges(rs), f"{rid}: ranges on {inst} not normalised"
                used[inst] += sum(len(r) for r in rs)
                seen.extend(rs)
            merge_ranges(seen)  # raises on duplicate positions across instances
        assert np.array_equal(used, self.used), f"used {self.used} != recount {used}"
        assert self._used_total == int(used.sum()), f"cached total {self._used_total} != {used.sum()}"
        assert np.all(self.used >= 0) and np.all(self.used <= self.capacity), (
            f"over-committed: used {self.used}, capacity {self.capacity}"
        )
        assert all(v > 0 for v in self._reserved.values()), "non-positive reservation"
        assert self.total_reserved == sum(self._reserved.values())
        assert self.total_reserved <= self.total_free, (
            f"reservations {self.total_reserved} exceed free {self.total_free}"
        )
