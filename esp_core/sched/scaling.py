"""Step 4, elastic scaling plan: where KV goes and who masters whom.

* `place_keeps`: proactive scale-down (docs/architecture.md). A prefill item's tokens are
  partitioned into contiguous ranges over the decode set D ⊆ ring. A request that fits
  on one instance goes to the *fullest* instance that still has room for it plus a
  headroom (best fit: small requests land on one instance and do not fragment the
  emptier ones); one that fits nowhere whole is split over the emptiest instances first
  (fewest pieces, hence fewest holders to talk to in decode).
* `assign_masters`: decode masters spread over the batch's instances (dense work
  balanced: at most ceil(B / |D|) per instance), preferring an instance that holds the
  most of the request's KV (its local partial needs no message).
* `choose_new_kv_instance`: the new token's KV goes on the master if it has a free
  slot, else on the holder with the most room, else on any instance of the batch with
  room; None means the batch must scale up (add an instance) or preempt.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from esp_core.sched.plan import KVKeep, TokenRange


def place_keeps(
    tokens: TokenRange,
    candidates: Sequence[int],
    free: np.ndarray | list[int],
    *,
    headroom: int = 0,
    prefer: Sequence[int] = (),
) -> tuple[KVKeep, ...] | None:
    """Keep ranges partitioning `tokens` over `candidates` (the allowed decode set).

    `free` (slots per instance, indexed by instance id) is decremented for what is
    placed. `prefer`: instances tried first for a whole fit (e.g. the request's current
    holders, so a chunked request keeps few holders). Returns None if it cannot fit.
    """
    need = tokens.end - tokens.start
    if need == 0:
        return ()
    # 1. whole fit, preferred instances first, fullest first (least free, then lowest id)
    # (a plain loop: at 256-instance rings, twice as fast as min() over the fitting ones;
    # a repeated candidate cannot change which one is fullest, so only the preferred
    # pool and the split below need them deduplicated -- most calls end in this loop)
    want = need + headroom
    pools: tuple[Sequence[int], ...] = (candidates,)
    if prefer:
        pools = (list(dict.fromkeys(p for p in prefer if p in candidates)), candidates)
    for pool in pools:
        inst, best = None, 0
        for i in pool:
            f = free[i]
            if f >= want and (inst is None or f < best or (f == best and i < inst)):
                inst, best = i, f
        if inst is not None:
            free[inst] -= need
            return (KVKeep(inst, (tokens,)),)
    # 2. split: emptiest first, keeping the headroom where possible, then without it
    cands = list(dict.fromkeys(candidates))
    if not cands:
        return None
    order = sorted(cands, key=lambda i: (-free[i], i))
    total = sum(int(free[i]) for i in order)
    if total < need:
        return None
    spare = sum(max(int(free[i]) - headroom, 0) for i in order)
    reserve = headroom if spare >= need else 0
    keeps: list[KVKeep] = []
    pos = tokens.start
    for inst in order:
        take = min(int(free[inst]) - reserve, tokens.end - pos)
        if take <= 0:
            continue
        keeps.append(KVKeep(inst, (TokenRange(pos, pos + take),)))
        free[inst] -= take
        pos += take
        if pos == tokens.end:
            break
    assert pos == tokens.end
    return tuple(keeps)


def spread_keeps(
    tokens: TokenRange,
    ring: Sequence[int],
    free: np.ndarray,
    *,
    headroom: int = 0,
) -> tuple[KVKeep, ...] | None:
    """Keep ranges splitting `tokens` evenly over `ring` (in ring order), each instance's
    share capped by its free slots (less `headroom` where possible) and the remainder
    spread over the others. A chunked prompt stored this way keeps its cached KV even
    over its holders, so later chunks attend to it at the ring's full parallelism.
    `free` is decremented; None if the ring cannot hold the tokens."""
    need = len(tokens)
    if need == 0:
        return ()
    ring = list(dict.fromkeys(ring))
    if not ring or sum(int(free[i]) for i in ring) < need:
        return None
    spare = sum(max(int(free[i]) - headroom, 0) for i in ring)
    reserve = headroom if spare >= need else 0
    cap = {i: max(int(free[i]) - reserve, 0) for i in ring}
    share = {i: 0 for i in ring}
    left, open_ = need, [i for i in ring if cap[i] > 0]
    while left > 0 and open_:  # water-filling: equal shares up to each cap
        each = max(left // len(open_), 1)
        for i in list(open_):
            take = min(each, cap[i] - share[i], left)
            share[i] += take
            left -= take
            if share[i] >= cap[i]:
                open_.remove(i)
            if left == 0:
                break
    if left > 0:
        return None
    keeps: list[KVKeep] = []
    pos = tokens.start
    for i in ring:
        if share[i]:
            keeps.append(KVKeep(i, (TokenRange(pos, pos + share[i]),)))
            free[i] -= share[i]
            pos += share[i]
    assert pos == tokens.end
    return tuple(keeps)


def assign_masters(
    holders_tokens: Sequence[Mapping[int, int]],
    instances: Sequence[int],
) -> list[int]:
    """Master instance per request (same order), balanced over `instances`."""
    n, m = len(holders_tokens), len(instances)
    if n == 0:
        return []
    cap = math.ceil(n / m)
    count = {i: 0 for i in instances}
    out: list[int] = []
    for held in holders_tokens:
        choice = None
        for inst, _ in sorted(held.items(), key=lambda kv: (-kv[1], kv[0])):
            if inst in count and count[inst] < cap:
                choice = inst
                break
        if choice is None:
            choice = min(instances, key=lambda i: (count[i], i))
        count[choice] += 1
        out.append(choice)
    return out


def choose_new_kv_instance(
    master: int,
    held: Mapping[int, int],
    instances: Sequence[int],
    free: np.ndarray,
) -> int | None:
    if free[master] > 0:
        return master
    holders = [i for i in held if free[i] > 0]
    if holders:
        return max(holders, key=lambda i: (free[i], -i))
    others = [i for i in instances if free[i] > 0]
    if others:
        return max(others, key=lambda i: (free[i], -i))
    return None


def masters_per_instance(masters: Sequence[int]) -> int:
    if not masters:
        return 0
    return max(Counter(masters).values())  # (np.unique: ~5x slower at decode-group sizes)
