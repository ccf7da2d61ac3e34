"""Multi-master decode attention across instances equals single-process attention of
each new token over all of its request's tokens (old KV spread over holders + itself),
and the new K/V lands on `new_kv_instance` (scale-up included). Also the general remote
partial attention with many queries per request (chunked prefill's cross attention)."""

import pytest
import torch

from esp_core.runtime.comm import P2PComm
from esp_core.runtime.distributed_decode import (
    DecodeAttention,
    DecodeSlot,
    QueryGroup,
    RemotePartialAttention,
)
from esp_serve.kernels.api import varlen_attention

pytestmark = pytest.mark.slow

LAYERS, HQ, HKV, D = 2, 4, 2, 8
TOL = 2e-5


def _spread_cache(me, placement, lengths, seed, extra_slots=8):
    """Full K/V per request and this instance's cache holding its share, scrambled slots.

    placement[i] = {instance: (lo, hi)} of request i's old tokens. Returns
    (kv_full list [layers, L, 2, Hkv, D], cache, local_slots {rid: slots}, free slot list).
    """
    g = torch.Generator().manual_seed(seed)
    kv_full = [torch.randn(LAYERS, L, 2, HKV, D, generator=g) for L in lengths]
    mine = [(i, lo, hi) for i, pl in enumerate(placement) for inst, (lo, hi) in pl.items() if inst == me]
    total = sum(hi - lo for _, lo, hi in mine) + extra_slots
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed + 100 + me))
    cache = torch.zeros(LAYERS, total, 2, HKV, D)
    local, used = {}, 0
    for i, lo, hi in mine:
        slots = perm[used : used + hi - lo]
        used += hi - lo
        cache[:, slots] = kv_full[i][:, lo:hi]
        local[f"r{i}"] = slots
    return kv_full, cache, local, perm[used:].tolist()


def _decode_case(ctx, P, lengths, placement, masters, new_kv, seed, device="cpu"):
    comm = P2PComm.from_world(timeout_s=10)
    me = comm.instance
    if me >= P:
        return None
    kv_full, cache, local, free = _spread_cache(me, placement, lengths, seed)
    cache = cache.to(device)
    local = {r: s.to(device) for r, s in local.items()}
    g = torch.Generator().manual_seed(seed + 7)
    q_new = torch.randn(LAYERS, len(lengths), HQ, D, generator=g)
    kv_new = torch.randn(LAYERS, len(lengths), 2, HKV, D, generator=g)
    items = [
        DecodeSlot(f"r{i}", L, masters[i], tuple(sorted(placement[i])), new_kv[i])
        for i, L in enumerate(lengths)
    ]
    dec = DecodeAttention(comm, items, cache, HQ, local)
    mine = [i for i, it in enumerate(items) if it.master == me]
    errs = []
    for layer in range(LAYERS):
        if mine:
            o = dec.attend(
                layer,
                q_new[layer, mine].to(device),
                kv_new[layer, mine, 0].to(device),
                kv_new[layer, mine, 1].to(device),
            ).cpu()
            for row, i in enumerate(mine):
                k_all = torch.cat([kv_full[i][layer, :, 0], kv_new[layer, i : i + 1, 0]])
                v_all = torch.cat([kv_full[i][layer, :, 1], kv_new[layer, i : i + 1, 1]])
                n = k_all.shape[0]
                ref, _ = varlen_attention(
                    q_new[layer, i : i + 1],
                    k_all,
                    v_all,
                    torch.tensor([n - 1]),
                    torch.arange(n),
                    torch.tensor([0, 1]),
                    torch.tensor([0, n]),
                )
                errs.append((o[row] - ref[0]).abs().max().item())
        else:
            dec.serve(layer)
    stored = {}

    def allocate(rid, pos):
        slot = free.pop(0)
        stored[rid] = (slot, pos)
        return slot

    dec.store_new_kv(allocate)
    cache = cache.cpu()
    store_ok = all(
        torch.equal(cache[:, slot], kv_new[:, int(rid[1:])]) and pos == lengths[int(rid[1:])]
        for rid, (slot, pos) in stored.items()
    )
    expected = sorted(f"r{i}" for i, d in enumerate(new_kv) if d == me)
    return max(errs, default=0.0), store_ok and sorted(stored) == expected


DECODE_CASES = {
    # P, lengths, placement (old KV ranges per instance), masters, new_kv_instance
    "one_instance": (1, [5, 9], [{0: (0, 5)}, {0: (0, 9)}], [0, 0], [0, 0]),
    "spread_two": (2, [12, 7], [{0: (0, 6), 1: (6, 12)}, {1: (0, 7)}], [1, 0], [1, 1]),
    # request 0 names instance 2 as a holder with zero tokens of it; request 1 scales up
    # onto instance 3 (outside its holders); instance 3 masters nothing
    "zero_token_holder_and_scale_up": (
        4,
        [10, 6, 3],
        [{0: (0, 4), 1: (4, 10), 2: (10, 10)}, {2: (0, 6)}, {0: (0, 1), 1: (1, 2), 2: (2, 3)}],
        [2, 0, 1],
        [0, 3, 2],
    ),
    "three_masters_mixed": (
        3,
        [4, 15, 8, 1],
        [{0: (0, 4)}, {0: (0, 5), 1: (5, 10), 2: (10, 15)}, {1: (0, 8)}, {2: (0, 1)}],
        [1, 2, 0, 0],
        [1, 0, 2, 2],
    ),
}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_exchange_equals_single_process(dist_group, case):
    P, lengths, placement, masters, new_kv = DECODE_CASES[case]
    results = dist_group.run(_decode_case, P, lengths, placement, masters, new_kv, 99)
    for rank, res in enumerate(results[:P]):
        err, store_ok = res
        assert err < TOL, (rank, err)
        assert store_ok, rank


def _cross_case(ctx, owners_counts, lengths, placement, seed):
    """Many queries per request, owned by several instances, over KV on holders."""
    comm = P2PComm.from_world(timeout_s=10)
    me = comm.instance
    kv_full, cache, local, _ = _spread_cache(me, placement, lengths, seed)
    g = torch.Generator().manual_seed(seed + 3)
    groups, qs = [], []
    for i, per_owner in enumerate(owners_counts):
        for owner, n in per_owner:
            groups.append(QueryGroup(f"r{i}", owner, n, tuple(sorted(placement[i]))))
            qs.append((i, owner, torch.randn(n, HQ, D, generator=g)))
    ex = RemotePartialAttention(comm, groups, HQ, D, local)
    q = torch.cat([t for _, o, t in qs if o == me] or [torch.zeros(0, HQ, D)])
    o, lse = ex.layer(cache[1], q)
    errs, row = [], 0
    for i, owner, t in qs:
        if owner != me:
            continue
        L = lengths[i]
        ref_o, ref_lse = varlen_attention(
            t,
            kv_full[i][1, :, 0],
            kv_full[i][1, :, 1],
            torch.zeros(t.shape[0], dtype=torch.int64),
            torch.zeros(L, dtype=torch.int64),
            torch.tensor([0, t.shape[0]]),
            torch.tensor([0, L]),
            causal=False,
        )
        n = t.shape[0]
        if L == 0:
            errs.append(
                0.0 if (torch.isinf(lse[row : row + n]).all() and not o[row : row + n].any()) else 1.0
            )
        else:
            errs.append(
                max(
                    (o[row : row + n] - ref_o).abs().max().item(),
                    (lse[row : row + n] - ref_lse).abs().max().item(),
                )
            )
        row += n
    return max(errs, default=0.0)


def test_cross_attention_many_queries(dist_group):
    lengths = [20, 9, 0]
    placement = [{1: (0, 8), 3: (8, 20)}, {0: (0, 9)}, {}]
    owners_counts = [[(0, 3), (1, 2), (2, 3), (3, 1)], [(0, 2), (3, 4)], [(2, 2)]]
    for err in dist_group.run(_cross_case, owners_counts, lengths, placement, 5):
        assert err < TOL
