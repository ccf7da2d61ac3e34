"""KV migration between instances (`IterationPlan.migrations`): the one place KV moves.

Both ends execute the plan's migrations in plan order (each instance only those naming
it). Because that order is the same everywhere, the earliest unfinished migration always
has both ends waiting on it, so sequential blocking transfers cannot deadlock.

Per migration: both ends derive the moved positions from the plan (the migration's
ranges, which the scheduler moves only where the source holds every position), so only
the K/V travels, `[n, layers, 2, Hkv, D]` in ascending position order, with no size
message first; the destination allocates slots and stores them; the source frees its
copies. A source missing a position of the ranges refuses the migration (the scheduler's
view of the pools and the pool itself disagree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esp_core.runtime.comm import P2PComm
from esp_core.runtime.kv_pool import KVPool
from esp_core.sched.plan import Migration

_TAG = 41


def moved_positions(mig: Migration) -> list[int]:
    """The positions a migration moves, ascending (the order the K/V rows travel in)."""
    return sorted({p for r in mig.ranges for p in range(r.start, r.end)})


def run_migrations(pool: KVPool, migrations: Sequence[Migration], instance: int, comm: P2PComm) -> int:
    """Execute this instance's side of each migration; returns tokens moved in or out."""
    moved = 0
    for mig in migrations:
        if instance not in (mig.src, mig.dst) or mig.src == mig.dst:
            continue
        positions = moved_positions(mig)
        if instance == mig.src:
            index_of = {p: i for i, p in enumerate(pool.positions_of(mig.request_id))}
            missing = [p for p in positions if p not in index_of]
            if missing:
                # the destination is already waiting for this K/V: fail it now, not at the timeout
                comm.abort(f"migration of request {mig.request_id!r}: source lacks positions")
                raise ValueError(
                    f"migration of request {mig.request_id!r} to instance {mig.dst}: positions "
                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''} are not on instance {instance}"
                )
            rows = torch.tensor([index_of[p] for p in positions], dtype=torch.int64)
            slots = pool.slots_of(mig.request_id)[rows.to(pool.kv.device)]
            kv = pool.kv.index_select(1, slots).transpose(0, 1)
            comm.exchange([(mig.dst, kv.contiguous())], [], _TAG)
            pool.free_positions(mig.request_id, positions)
        else:
            kv = torch.empty(
                len(positions),
                *pool.kv.shape[0:1],
                *pool.kv.shape[2:],
                dtype=pool.kv.dtype,
                device=pool.kv.device,
            )
            comm.exchange([], [(mig.src, kv)], _TAG)
            slots = pool.allocate(mig.request_id, positions)
            pool.kv[:, slots] = kv.transpose(0, 1)  # [layers, n, 2, Hkv, D]
        moved += len(positions)
    return moved
