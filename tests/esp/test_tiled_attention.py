"""Tile-wise ring-step attention (bounded memory, skipped masked tiles) equals one varlen
attention call, on random striped varlen batches with empty requests and tiny tiles."""

import random

import torch

from esp_core.runtime.ring_attention import (
    BlockIndex,
    StripedChunk,
    empty_accumulator,
    striped_positions,
    tiled_attention,
)
from esp_serve.kernels.api import varlen_attention

TOL = 1e-5


def test_tiled_equals_untiled_on_random_striped_batches():
    rng = random.Random(0)
    for trial in range(150):
        P, B = rng.randint(1, 4), rng.randint(1, 6)
        chunks = [StripedChunk(0, rng.randint(0, 40), rng.randrange(P)) for _ in range(B)]
        rq, rk = rng.randrange(P), rng.randrange(P)  # query rank vs key block's rank
        qp = [striped_positions(c, P, rq) for c in chunks]
        kp = [striped_positions(c, P, rk) for c in chunks]
        cq = torch.tensor([0] + [len(x) for x in qp]).cumsum(0)
        ck = torch.tensor([0] + [len(x) for x in kp]).cumsum(0)
        q_pos, k_pos = torch.cat(qp), torch.cat(kp)
        q = torch.randn(len(q_pos), 2, 4)
        k, v = torch.randn(len(k_pos), 1, 4), torch.randn(len(k_pos), 1, 4)
        ref_o, ref_lse = varlen_attention(q, k, v, q_pos, k_pos, cq, ck)
        q_index = BlockIndex(cq.tolist(), q_pos.tolist())
        k_index = BlockIndex(ck.tolist(), k_pos.tolist())
        o, lse = tiled_attention(
            *empty_accumulator(q),
            q,
            k,
            v,
            q_pos,
            k_pos,
            cq,
            ck,
            q_index,
            k_index,
            None,
            rng.randint(1, 9),
            rng.randint(1, 9),
        )
        assert torch.allclose(o, ref_o, atol=TOL), trial
        both_empty = torch.isinf(ref_lse) & torch.isinf(lse)
        assert ((lse - ref_lse).abs().masked_fill(both_empty, 0) < TOL).all(), trial
