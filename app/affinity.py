"""Prefix affinity: send a prompt to the ESP group that probably holds its prefix's KV.

Each group has its own prefix cache (esp_core/sched/prefix_cache.py), so a second question
on the same document hits only if it reaches the group that served the first. The router
remembers, per group, the block hashes of the prompts it sent there (`RoutedPrefixes`: a
bounded LRU set per group, at most the group's KV in blocks), and `rank_with_affinity`
puts the group with the longest remembered prefix first when

* the match covers at least `min_match` of the prompt's tokens (a short shared preamble
  is not worth giving up load balance for), and
* that group has KV headroom for the rest of the prompt (the matched part is cached: it
  needs no new slots) and its saturation is at most `max_imbalance` above the least
  saturated group's (GroupLoad, app/saturation.py).

Otherwise the headroom ranking (rank_groups) stands. What was routed, not what the groups
report: a follow-up question arrives within a second, before the next routing-stats
report, and a report of every cached hash would cost each group's engine loop a walk of
its cache every period. The price: the record does not see evictions (a stale hint sends
a prompt to a group that must prefill it after all, as it would elsewhere).

Hashes are the prompt's block hash chain (computed once, in the ingress): equal hashes at
block i mean equal tokens up to block i's end, so the match is the run of leading blocks
remembered. Blocks are remembered last block first, so a prompt's first blocks are the
most recently used and eviction takes a chain's tail before its head: what is remembered
of a chain is a prefix of it. Pure Python (no Ray), unit-tested alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from esp_serve.app.saturation import GroupLoad, rank_groups

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class AffinityPolicy:
    block_tokens: int = 64  # tokens per hash (prefix_cache.block_tokens)
    min_match: float = 0.5  # matched tokens / prompt tokens to prefer the holder
    max_imbalance: float = 0.5  # holder's saturation - the least saturated group's
    max_blocks_per_group: int = 32768  # remembered hashes per group, at most


class RoutedPrefixes(Generic[K]):
    """Per group, an LRU set of the block hashes routed there."""

    def __init__(self, max_blocks_per_group: int) -> None:
        if max_blocks_per_group < 1:
            raise ValueError("max_blocks_per_group must be >= 1")
        self.max_blocks_per_group = max_blocks_per_group
        self._blocks: dict[K, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        """Hashes remembered over all groups."""
        return sum(len(b) for b in self._blocks.values())

    def groups(self) -> set[K]:
        return set(self._blocks)

    def record(self, group: K, hashes: Sequence[int], capacity_blocks: int | None = None) -> None:
        """`hashes` were routed to `group`; keep at most `capacity_blocks` (the group's KV
        in blocks, when known) and never more than max_blocks_per_group."""
        if not hashes:
            return
        cap = self.max_blocks_per_group
        if capacity_blocks is not None:
            cap = max(1, min(cap, capacity_blocks))
        blocks = self._blocks.setdefault(group, OrderedDict())
        for h in reversed(hashes):  # the head last: most recent, evicted last
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > cap:
            blocks.popitem(last=False)

    def matched_blocks(self, group: K, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` remembered for `group`."""
        blocks = self._blocks.get(group)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def forget(self, group: K) -> None:
        self._blocks.pop(group, None)

    def keep_only(self, groups: Iterable[K]) -> None:
        """Drop the groups that went away."""
        alive = set(groups)
        for g in [g for g in self._blocks if g not in alive]:
            del self._blocks[g]


def affinity_choice(
    loads: Mapping[K, GroupLoad | None],
    prompt_tokens: int,
    hashes: Sequence[int],
    routed: RoutedPrefixes[K],
    policy: AffinityPolicy,
    ranks: list[list[K]] | None = None,
) -> K | None:
    """The group to prefer for its cached prefix, or None (rank by headroom). `ranks`:
    rank_groups(loads, prompt_tokens), when the caller has it already."""
    if not hashes or prompt_tokens <= 0:
        return None
    known = [load.saturation for load in loads.values() if load is not None]
    least = min(known) if known else 0.0
    best_matched: int = 0
    choice: K | None = None
    # in headroom order, so that of equal matches the one with more room wins
    if ranks is None:
        ranks = rank_groups(loads, prompt_tokens)
    for k in (k for rank in ranks for k in rank):
        matched = routed.matched_blocks(k, hashes) * policy.block_tokens
        if matched <= best_matched or matched < policy.min_match * prompt_tokens:
            continue
        if _has_room(loads[k], prompt_tokens - matched, least, policy):
            best_matched, choice = matched, k
    return choice


def _has_room(
    load: GroupLoad | None, rest_tokens: int, least_saturation: float, policy: AffinityPolicy
) -> bool:
    """Headroom for the uncached rest, and not much busier than the emptiest group. A
    group that has not reported yet was just sent this prefix: probably nearly empty."""
    if load is None:
        return True
    return load.headroom(rest_tokens) >= 0 and load.saturation - least_saturation <= policy.max_imbalance


def rank_with_affinity(
    loads: Mapping[K, GroupLoad | None],
    prompt_tokens: int,
    hashes: Sequence[int],
    routed: RoutedPrefixes[K],
    policy: AffinityPolicy,
) -> list[list[K]]:
    """rank_groups, with the group holding the prompt's prefix first when it qualifies."""
    ranks = rank_groups(loads, prompt_tokens)
    chosen = affinity_choice(loads, prompt_tokens, hashes, routed, policy, ranks)
    if chosen is None:
        return ranks
    rest = [[k for k in rank if k != chosen] for rank in ranks]
    return [[chosen]] + [rank for rank in rest if rank]
