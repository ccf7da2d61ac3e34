"""KV migration between instances (`IterationPlan.migrations`): the one place KV moves.

Both ends execute the plan's migrations in plan order (each instance only those naming
it). Because that order is the same everywhere, the earliest unfinished migration always
has both ends waiting on it, so sequential blocking transfers cannot deadlock.

Per migration: the source finds its slots of the request inside the ranges, sends the
positions (sizes first: the destination does not know how many the source holds) and then
the K/V of every layer `[n, layers, 2, Hkv, D]`; the destination allocates slots and
stores them; the source frees its copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esp_core.runtime.comm import P2PComm
from esp_core.runtime.kv_pool import KVPool
from esp_core.sched.plan import Migration

_TAG = 41


def run_migrations(pool: KVPool, migrations: Sequence[Migration], instance: int, comm: P2PComm) -> int:
    """Execute this instance's side of each migration; returns tokens moved in or out."""
    moved = 0
    for mig in migrations:
        if instance not in (mig.src, mig.dst) or mig.src == mig.dst:
            continue
        if instance == mig.src:
            slots = pool.slots_of(mig.request_id)
            pos = torch.tensor(pool.positions_of(mig.request_id), dtype=torch.int64)
            inside = torch.zeros(pos.shape, dtype=torch.bool)
            for r in mig.ranges:
                inside |= (pos >= r.start) & (pos < r.end)
            idx = torch.nonzero(inside).flatten()
            comm.exchange_varsize({mig.dst: pos[idx]}, [], (), torch.int64, tag=_TAG)
            kv = pool.kv.index_select(1, slots[idx.to(slots.device)]).transpose(0, 1)
            comm.exchange([(mig.dst, kv.contiguous())], [], _TAG + 1)
            pool.free_positions(mig.request_id, pos[idx].tolist())
            moved += int(idx.numel())
        else:
            got = comm.exchange_varsize({}, [mig.src], (), torch.int64, tag=_TAG)[mig.src]
            kv = torch.empty(
                got.numel(),
                *pool.kv.shape[0:1],
                *pool.kv.shape[2:],
                dtype=pool.kv.dtype,
                device=pool.kv.device,
            )
            comm.exchange([], [(mig.src, kv)], _TAG + 1)
            slots = pool.allocate(mig.request_id, got.tolist())
            pool.kv[:, slots] = kv.transpose(0, 1)  # [layers, n, 2, Hkv, D]
            moved += int(got.numel())
    return moved
