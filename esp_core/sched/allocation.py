"""Step 2, elastic instance allocation: which instances this round's prefills get.

New prefills always get the idle instances no decode batch owns. They may also take
the instances of a decode batch that is between steps. That batch cannot continue on
fewer instances (its KV is there), so either

* it is *paused* for the prefill and merged with the new requests afterwards; cost
  charged: prefill time x paused requests (LoongServe's rule), or
* (policy esp) its KV on some instances is *migrated* onto the instances it keeps
  (compaction), freeing those for the prefill; cost charged: migration time x
  (its requests + the new requests, all of which wait for the copy). The migration
  time comes from the cost model (KV bytes per token / link bandwidth).

A borrow is taken only when the gain -- the admitted requests' prefill latency saved,
in request-seconds -- exceeds that cost (gain vs delay). When the free instances cannot
host the admitted requests at all, their alternative latency includes `wait_alt_s`, the
estimated time until instances free up by themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupView:
    """What allocation needs to know of one ready decode group."""

    gid: int
    instances: tuple[int, ...]
    num_requests: int
    free_slots: tuple[int, ...]  # per instance, same order as `instances`
    kv_tokens: tuple[int, ...]  # KV of the group per instance, same order
    borrowable: bool = True  # loongserve: only every N decode steps
    migratable: bool = True  # no shared prefix-cache KV (shared slots never migrate)


@dataclass
class Allocation:
    instances: list[int]
    paused_groups: list[int] = field(default_factory=list)
    # gid -> instances it gives up after migrating their KV onto its other instances
    compacted: dict[int, tuple[int, ...]] = field(default_factory=dict)
    migration_delay_s: float = 0.0


def compaction_candidates(group: GroupView, growth_margin: int) -> tuple[int, ...]:
    """Instances of `group` whose KV fits on the group's other instances (least-loaded
    first), leaving at least one instance and `growth_margin` slots per request."""
    order = sorted(range(len(group.instances)), key=lambda j: (group.kv_tokens[j], -group.free_slots[j]))
    keep = set(range(len(group.instances)))
    freed: list[int] = []
    for j in order:
        if len(keep) <= 1:
            break
        rest = keep - {j}
        moved = sum(group.kv_tokens[x] for x in freed) + group.kv_tokens[j]
        room = sum(group.free_slots[x] for x in rest) - sum(group.kv_tokens[x] for x in freed if x in rest)
        if room - moved >= growth_margin * group.num_requests:
            keep = rest
            freed.append(j)
    return tuple(group.instances[j] for j in freed)


def allocate(
    *,
    free_instances: Sequence[int],
    free_room: int,
    groups: Sequence[GroupView],
    need_tokens: int,
    num_new: int,
    prefill_time: Callable[[int], float],
    wait_alt_s: float,
    gain_vs_delay: bool,
    allow_migration: bool,
    migration_time: Callable[[int], float],
    growth_margin: int = 16,
) -> Allocation:
    """Choose instances for prefills of `num_new` requests needing `need_tokens` slots.

    `prefill_time(dop)` estimates the round's prefill time on `dop` instances.
    """
    alloc = Allocation(instances=list(free_instances))
    room = free_room
    wait_alt_s = min(wait_alt_s, 1e4)  # keep the arithmetic finite ("never" = very long)

    def latency(dop: int, room_now: int) -> float:
        if dop == 0 or room_now < need_tokens:
            return wait_alt_s + prefill_time(max(dop, 1))
        return prefill_time(dop)

    # cheapest pause per instance first
    for g in sorted(
        (g for g in groups if g.borrowable), key=lambda g: (g.num_requests / len(g.instances), g.gid)
    ):
        dop = len(alloc.instances)
        before = latency(dop, room)
        # pause: all of the group's instances (and their free slots) join the prefill
        after = latency(dop + len(g.instances), room + sum(g.free_slots))
        net = num_new * (before - after) - after * g.num_requests
        migrate = _compaction(g, growth_margin, migration_time) if allow_migration and g.migratable else None
        if migrate is not None:  # migrate: only some instances leave, after moving their KV
            after_m = latency(dop + len(migrate.freed), room + migrate.freed_room) + migrate.time_s
            migrate_net = num_new * (before - after_m) - migrate.time_s * (g.num_requests + num_new)
            if migrate_net > net:
                net = migrate_net
            else:
                migrate = None  # ties go to pausing
        if gain_vs_delay:
            if net <= 0:
                continue
        elif room >= need_tokens and dop > 0:
            break  # without the rule, borrow only what is needed to fit
        if migrate is None:
            alloc.instances.extend(g.instances)
            alloc.paused_groups.append(g.gid)
            room += sum(g.free_slots)
        else:
            alloc.instances.extend(migrate.freed)
            alloc.compacted[g.gid] = migrate.freed
            room += migrate.freed_room
            alloc.migration_delay_s = max(alloc.migration_delay_s, migrate.time_s)
    return alloc


@dataclass(frozen=True)
class _Compaction:
    """Freeing some of a decode group's instances by migrating their KV to the others."""

    freed: tuple[int, ...]  # instances that leave the group
    freed_room: int  # their free slots plus the slots their migrated KV leaves
    time_s: float  # the migration's time (the largest KV moved)


def _compaction(
    g: GroupView, growth_margin: int, migration_time: Callable[[int], float]
) -> _Compaction | None:
    freed = compaction_candidates(g, growth_margin)
    if not freed:
        return None
    at = [g.instances.index(i) for i in freed]
    return _Compaction(
        freed=freed,
        freed_room=sum(g.free_slots[j] + g.kv_tokens[j] for j in at),
        time_s=migration_time(max(g.kv_tokens[j] for j in at)),
    )
