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
* `share_prefix(src, dst, keep_len)` is a hit by a second reader: `dst` refers to the
  very slots of `src`'s positions [0, keep_len); both hold them.

Shared KV: a request's (or cache entry's) KV is a chain of shared segments -- each a
run of positions [start, end) with its slots per instance and the set of holders that
refer to it -- followed by the positions it owns alone. A share of [0, k) turns the
source's own positions below k into a new segment (nothing moves) and adds the reader
to every segment of the chain; a slot is freed when the last holder of its segment lets
go (`release`). Shares start only at segment ends (`shareable`), so segments never
split. Shared slots are counted once in `used`; positions in a segment never migrate
(`move` takes own positions only; decode groups holding shared KV are not compacted).

Slots are committed when a plan is *emitted* (the executor writes them when the batch
runs) and freed when the release is emitted (releases run before batches in a plan).
`check_invariants()` re-derives every counter from the per-request ranges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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


@dataclass
class SharedSegment:
    """Slots of positions [start, end) that every holder in `holders` reads."""

    start: int
    end: int
    ranges: dict[int, list[TokenRange]]  # inst -> positions held there
    holders: set[str] = field(default_factory=set)

    def tokens_on(self, inst: int) -> int:
        return sum(len(r) for r in self.ranges.get(inst, ()))


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
        self._segments: dict[int, SharedSegment] = {}  # segment id -> segment
        self._chain: dict[str, list[int]] = {}  # rid -> its segments, by position
        self._next_segment = 0

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

    def _segs(self, rid: str) -> list[SharedSegment]:
        return [self._segments[g] for g in self._chain.get(rid, ())]

    def segments_of(self, rid: str) -> list[SharedSegment]:
        """`rid`'s shared segments, by position."""
        return self._segs(rid)

    def holders(self, rid: str) -> tuple[int, ...]:
        """Instances holding KV of `rid` (its own or shared), ascending."""
        own = self._ranges.get(rid, {})
        if rid not in self._chain:
            return tuple(sorted(own))
        return tuple(sorted(set(own).union(*(g.ranges for g in self._segs(rid)))))

    def tokens_on(self, rid: str, inst: int) -> int:
        own = sum(len(r) for r in self._ranges.get(rid, {}).get(inst, ()))
        return own + sum(g.tokens_on(inst) for g in self._segs(rid))

    def tokens_of(self, rid: str) -> int:
        own = sum(len(r) for rs in self._ranges.get(rid, {}).values() for r in rs)
        return own + sum(g.end - g.start for g in self._segs(rid))

    def ranges_on(self, rid: str, inst: int) -> tuple[TokenRange, ...]:
        """Positions of `rid` on `inst`, own and shared."""
        own = self._ranges.get(rid, {}).get(inst, ())
        if rid not in self._chain:
            return tuple(own)
        return tuple(merge_ranges([r for g in self._segs(rid) for r in g.ranges.get(inst, ())] + list(own)))

    def placement(self, rid: str) -> dict[int, int]:
        """inst -> tokens of `rid` held there (own and shared)."""
        if rid not in self._chain:  # (in the order first written)
            return self.own_placement(rid)
        return {i: self.tokens_on(rid, i) for i in self.holders(rid)}

    def step_reads(self, rids: Iterable[str]) -> dict[int, int]:
        """inst -> KV tokens one decode step of `rids` reads there: own tokens of each, and
        each shared segment once for all its readers (the executors' shared-prefix
        attention reads a segment once per step)."""
        out: dict[int, int] = {}
        seen: set[int] = set()
        for rid in rids:
            for i, rs in self._ranges.get(rid, {}).items():
                out[i] = out.get(i, 0) + sum(len(r) for r in rs)
            for gid in self._chain.get(rid, ()):
                if gid not in seen:
                    seen.add(gid)
                    for i in self._segments[gid].ranges:
                        out[i] = out.get(i, 0) + self._segments[gid].tokens_on(i)
        return out

    def own_placement(self, rid: str) -> dict[int, int]:
        """inst -> tokens `rid` holds alone there (freed with it)."""
        return {i: sum(len(r) for r in rs) for i, rs in self._ranges.get(rid, {}).items()}

    def requests(self) -> list[str]:
        return list(self._ranges) + [r for r in self._chain if r not in self._ranges]

    def segment_len(self, rid: str) -> int:
        """Positions [0, n) of `rid` that lie in shared segments (0: none)."""
        chain = self._chain.get(rid)
        return self._segments[chain[-1]].end if chain else 0

    def in_segments(self, rid: str) -> bool:
        """Some of `rid`'s positions lie in shared segments (they cannot migrate)."""
        return rid in self._chain

    def shares_kv(self, rid: str) -> bool:
        """Some of `rid`'s KV is also another holder's."""
        return any(len(g.holders) > 1 for g in self._segs(rid))

    def segments(self) -> list[SharedSegment]:
        return list(self._segments.values())

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
        if self.used.item(inst) + n > self.capacity:  # (.item: a plain int, no numpy scalar)
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
        per_inst = self._ranges.get(rid)
        if per_inst is None:  # its first own KV (every request of a prefill round)
            per_inst = self._ranges[rid] = {}
            held_end = 0
        else:
            held_end = max((have[-1].end for have in per_inst.values() if have), default=0)
        if rid in self._chain:
            held_end = max(held_end, self._segments[self._chain[rid][-1]].end)
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
            seg_held = {
                -1 - n: list(g.ranges.get(i, ())) for n, g in enumerate(self._segs(rid)) for i in g.ranges
            }
            for other, held in [*per_inst.items(), *seg_held.items()]:
                for r in ranges:
                    for h in held:
                        if h.intersect(r) is not None:
                            raise ValueError(f"{rid}: positions {r} already held on {other}")
            per_inst[inst] = merge_ranges([*per_inst.get(inst, ()), *ranges])
        self.used[inst] = self.used.item(inst) + n
        self._used_total += n
        if rid in self._reserved:
            self.unreserve(rid, n)

    # ------------------------------------------------------------------ release / move

    def release(self, rid: str) -> tuple[int, ...]:
        """Let go of every slot and reservation of `rid`: its own slots are freed, its
        shared ones when it was their last holder. Returns the instances it was on."""
        insts = self.holders(rid)
        self.unreserve(rid)
        for inst, rs in self._ranges.pop(rid, {}).items():
            self._free_slots(inst, sum(len(r) for r in rs))
        for gid in self._chain.pop(rid, ()):
            seg = self._segments[gid]
            seg.holders.discard(rid)
            if not seg.holders:
                del self._segments[gid]
                for inst in seg.ranges:
                    self._free_slots(inst, seg.tokens_on(inst))
        return insts

    def _free_slots(self, inst: int, n: int) -> None:
        self.used[inst] -= n
        self._used_total -= n

    def adopt(self, src: str, dst: str, keep_len: int) -> tuple[int, ...]:
        """`dst` (holding nothing yet) takes `src`'s positions [0, keep_len), on the
        instances that hold them; `src` is gone afterwards. Returns `src`'s instances
        (every one of them applies the adoption: renames or frees)."""
        insts = self.holders(src)
        if src in self._chain:  # (its shared segments stay shared)
            self.share_prefix(src, dst, keep_len)
            self.release(src)
            return insts
        if self.holders(dst) or self.shareable(src, keep_len) != keep_len:
            raise ValueError(f"adopt {src} -> {dst}: {src} does not hold all of [0, {keep_len})")
        taken = self._own_between(src, 0, keep_len)
        for inst, rs in self._ranges.pop(src).items():
            self._free_slots(inst, sum(len(r) for r in rs) - sum(len(r) for r in taken.get(inst, ())))
        self._ranges[dst] = taken
        self.unreserve(src)
        return insts

    def freed_by_adopt(self, src: str, keep_len: int) -> int:
        """Slots an adoption of `src`'s [0, keep_len) frees: its own positions past it and
        the segments past it that only `src` holds."""
        past = TokenRange(keep_len, max(keep_len, self.tokens_of(src)))
        own = sum(len(x) for rs in self._ranges.get(src, {}).values() for r in rs if (x := r.intersect(past)))
        alone = (g for g in self._segs(src) if g.start >= keep_len and g.holders == {src})
        return own + sum(g.end - g.start for g in alone)

    def shareable(self, src: str, keep_len: int) -> int:
        """The longest prefix [0, k <= keep_len) of `src` a reader can share: shares
        start at segment ends (segments never split), past them any held length."""
        ends = [g.end for g in self._segs(src)]
        if ends and keep_len < ends[-1]:
            return max((e for e in ends if e <= keep_len), default=0)
        held = sum(len(r) for rs in self.prefix_ranges(src, keep_len).values() for r in rs)
        return keep_len if held == keep_len else 0

    def can_share_prefix(self, src: str, dst: str, keep_len: int, reserve: int = 0) -> bool:
        """A share of `src`'s [0, keep_len) is possible, and `reserve` more slots for `dst`
        fit without eating others' reservations (the shared slots exist already)."""
        ok = keep_len > 0 and self.shareable(src, keep_len) == keep_len and not self.holders(dst)
        return ok and reserve <= self.unreserved_free

    def share_prefix(self, src: str, dst: str, keep_len: int) -> None:
        """`dst` (holding nothing yet) refers to `src`'s slots of positions [0, keep_len)."""
        if self.holders(dst) or self.shareable(src, keep_len) != keep_len or keep_len <= 0:
            raise ValueError(f"share of {src}'s [0, {keep_len}) with {dst}: not possible")
        chain = self._chain.setdefault(src, [])
        start = self._segments[chain[-1]].end if chain else 0
        if keep_len > start:  # src's own positions [start, keep_len) become a segment
            cut = {i: merge_ranges(rs) for i, rs in self._own_between(src, start, keep_len).items()}
            own = self._ranges[src]
            for i, rs in cut.items():
                left = subtract_ranges(own[i], rs)
                if left:
                    own[i] = left
                else:
                    del own[i]
            if not own:
                del self._ranges[src]
            self._segments[self._next_segment] = SharedSegment(start, keep_len, cut, {src})
            chain.append(self._next_segment)
            self._next_segment += 1
        taken = [g for g in chain if self._segments[g].end <= keep_len]
        for g in taken:
            self._segments[g].holders.add(dst)
        self._chain[dst] = taken

    def _own_between(self, rid: str, start: int, end: int) -> dict[int, list[TokenRange]]:
        span = TokenRange(start, end)
        return {
            inst: cut
            for inst, rs in self._ranges.get(rid, {}).items()
            if (cut := [x for r in rs if (x := r.intersect(span)) is not None])
        }

    def prefix_ranges(self, rid: str, keep_len: int) -> dict[int, list[TokenRange]]:
        """inst -> `rid`'s ranges (own and shared) below `keep_len` there."""
        keep = TokenRange(0, keep_len)
        return {
            inst: cut
            for inst in self.holders(rid)
            if (cut := [x for r in self.ranges_on(rid, inst) if (x := r.intersect(keep)) is not None])
        }

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
            for inst, rs in per_inst.items():
                assert rs, f"{rid}: empty range list kept on {inst}"
                assert rs == merge_ranges(rs), f"{rid}: ranges on {inst} not normalised"
                used[inst] += sum(len(r) for r in rs)
        for gid, seg in self._segments.items():
            assert seg.holders, f"segment {gid} without holders"
            assert merge_ranges(r for rs in seg.ranges.values() for r in rs) == [
                TokenRange(seg.start, seg.end)
            ]
            for inst in seg.ranges:
                used[inst] += seg.tokens_on(inst)
            assert all(gid in self._chain.get(h, ()) for h in seg.holders), f"segment {gid}: holders"
        for rid, chain in self._chain.items():
            assert chain and all(rid in self._segments[g].holders for g in chain), rid
            ends = [0] + [self._segments[g].end for g in chain]
            assert [self._segments[g].start for g in chain] == ends[:-1], f"{rid}: chain has gaps"
        for rid in self.requests():  # raises on duplicate positions across instances
            merge_ranges(r for i in self.holders(rid) for r in self.ranges_on(rid, i))
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
