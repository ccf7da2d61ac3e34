"""The torch production path against the naive dense ground truth (kernels/naive.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from esp_serve.kernels import naive, reference
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close

DTYPES = [torch.float32, torch.bfloat16]
HEADS = [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2)]  # GQA ratios 1, 2, 4, 8 (MQA), 8


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_striped_ring_steps(P, dtype, tiling, engine):
    """Every (query rank, key rank) pair of a striped batch with rotated start offsets,
    uneven lengths (some ranks get no token of a request) and re-prefill bases."""
    lengths, bases = [1, 2, 7, 40, 3, 29], [0, 0, 5, 0, 11, 3]
    for (rq, rk), (hq, hkv) in zip(itertools.product(range(P), range(P)), itertools.cycle(HEADS)):
        q, k, v, qp, kp, cq, ck = cases.striped_step(
            lengths, P, rq, rk, hq, hkv, 16, dtype, seed=P * 100 + rq * 10 + rk, bases=bases
        )
        o, lse = reference.varlen_attention(q, k, v, qp, kp, cq, ck)
        o_ref, lse_ref = naive.varlen_attention(q, k, v, qp, kp, cq, ck)
        assert o.dtype == dtype and o.shape == q.shape and lse.shape == q.shape[:2]
        assert_attention_close(o, lse, o_ref, lse_ref, dtype)


def test_fully_masked_rows_are_exact_zero_and_neg_inf(tiling):
    """Striping: local query 0 of a rank whose first position precedes the key rank's
    first position sees nothing at all (lse = -inf, o = 0, no NaN)."""
    q, k, v, qp, kp, cq, ck = cases.striped_step([8, 13], 4, 0, 3, 4, 2, 16, torch.float32, seed=1)
    o, lse = reference.varlen_attention(q, k, v, qp, kp, cq, ck)
    hidden = (qp[:, None] < kp[None, :]).all(dim=1)  # per request both have keys
    assert hidden.any()
    assert torch.isneginf(lse[hidden]).all() and (o[hidden] == 0).all()
    o_ref, lse_ref = naive.varlen_attention(q, k, v, qp, kp, cq, ck)
    assert_attention_close(o, lse, o_ref, lse_ref, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_contiguous_prefill_and_chunk_after_cache(causal, tiling, engine):
    """P = 1: plain prefill (q_pos == k_pos) and chunks whose keys include cached ones
    (request 1: the last query's position equals the first position of a key block)."""
    gen = torch.Generator().manual_seed(3)
    lq, lk = [37, 5, 0, 64, 5], [37, 9, 4, 100, 0]
    q, k, v = cases.qkv(sum(lq), sum(lk), 8, 2, 32, torch.float32, gen)
    qp = torch.cat([torch.arange(max(n - m, 0), max(n - m, 0) + m) for m, n in zip(lq, lk)]).long()
    kp = torch.cat([torch.arange(n) for n in lk]).long()
    args = (q, k, v, qp, kp, cases.cu(lq), cases.cu(lk))
    o, lse = reference.varlen_attention(*args, causal=causal)
    o_ref, lse_ref = naive.varlen_attention(*args, causal=causal)
    assert_attention_close(o, lse, o_ref, lse_ref, torch.float32)
    assert torch.isneginf(lse[-5:]).all() and (o[-5:] == 0).all()  # last request: no keys


def test_unsorted_positions(tiling):
    """The mask is defined on positions, not indices: shuffled tokens give the same
    answer row for row."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = cases.qkv(50, 70, 4, 4, 16, torch.float32, gen)
    qp, kp = torch.randperm(90, generator=gen)[:50], torch.randperm(90, generator=gen)[:70]
    args = (q, k, v, qp, kp, cases.cu([50]), cases.cu([70]))
    assert_attention_close(*reference.varlen_attention(*args), *naive.varlen_attention(*args), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_slot_attention(dtype, hq, hkv, tiling, engine):
    """Decode (one query each), chunked-prefill tails (several queries), requests with no
    slots or no queries; random slot order in a shared pool."""
    n_q = [1, 1, 0, 1, 6, 1, 2, 1]
    n_s = [5, 0, 4, 33, 17, 1, 12, 64]
    q, cq, kv, ids, cs = cases.slot_case(n_q, n_s, hq, hkv, 16, dtype, seed=hq * 10 + hkv)
    o, lse = reference.slot_attention(q, cq, kv, ids, cs)
    o_ref, lse_ref = naive.slot_attention(q, cq, kv, ids, cs)
    assert o.dtype == dtype
    assert_attention_close(o, lse, o_ref, lse_ref, dtype)
    assert torch.isneginf(lse[1]).all() and (o[1] == 0).all()  # request 1 has no slots


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_decode_step_padded_path(dtype, hq, hkv, tiling, engine):
    """One query per request (a decode step): short slot lists take the padded one-gather
    path, long ones (tiny tiling) the split-KV path; requests with no slots get (0, -inf)."""
    n_s = [5, 0, 33, 1, 12, 64, 0, 2]
    q, cq, kv, ids, cs = cases.slot_case([1] * len(n_s), n_s, hq, hkv, 16, dtype, seed=hq + 3 * hkv)
    o, lse = reference.slot_attention(q, cq, kv, ids, cs)
    assert o.dtype == dtype
    assert_attention_close(o, lse, *naive.slot_attention(q, cq, kv, ids, cs), dtype)
    for b in (1, 6):
        assert torch.isneginf(lse[b]).all() and (o[b] == 0).all()


@pytest.mark.parametrize(
    "n_s,padded",
    [
        ([40], True),  # one request past DECODE_WIDTH: no padding at all
        ([40, 36], True),  # 80 gathered rows for 76 keys: within the slack
        ([40, 4], False),  # 80 rows for 44 keys: the key-chunked driver
        ([40, 0, 38], False),  # an empty request pads a whole row
    ],
)
def test_decode_lists_past_the_width_take_the_padded_path_while_padding_is_small(n_s, padded, monkeypatch):
    """A lone long-context stream (or a batch of similar lengths) gathers its keys in one
    block per layer even past DECODE_WIDTH; a batch whose padding would add more than
    DECODE_PAD_SLACK of its keys does not. Both paths give the naive result."""
    monkeypatch.setattr(reference, "DECODE_WIDTH", 16)
    monkeypatch.setattr(reference, "DECODE_PAD_SLACK", 0.25)
    q, cq, kv, ids, cs = cases.slot_case([1] * len(n_s), n_s, 8, 2, 16, torch.float32, seed=len(n_s))
    row_bytes = 8 * kv.shape[2] * kv.shape[3]
    assert reference._decode_fits(cq.tolist(), cs.tolist(), row_bytes) is padded
    assert_attention_close(
        *reference.slot_attention(q, cq, kv, ids, cs),
        *naive.slot_attention(q, cq, kv, ids, cs),
        torch.float32,
    )
    # and the gather stays within DECODE_BYTES whatever the slack says
    monkeypatch.setattr(reference, "DECODE_BYTES", row_bytes * (len(n_s) * max(n_s) - 1))
    assert not reference._decode_fits(cq.tolist(), cs.tolist(), row_bytes)


def test_decode_index_is_shared_by_layers_and_follows_changes():
    """Every layer of a step passes the same index tensors: the padded index is built once
    and reused, and rebuilt when the tensors change in place or new ones come."""
    q, cq, kv, ids, cs = cases.slot_case([1, 1, 1], [4, 9, 2], 8, 2, 16, torch.float32, seed=5)
    layers = [kv, torch.randn_like(kv)]
    for layer in layers:
        assert_attention_close(
            *reference.slot_attention(q, cq, layer, ids, cs),
            *naive.slot_attention(q, cq, layer, ids, cs),
            torch.float32,
        )
    assert len(reference._decode_cache.entries) >= 1
    first = reference._decode_cache.entries[0][-1]
    reference.slot_attention(q, cq, layers[1], ids, cs)
    assert reference._decode_cache.entries[0][-1] is first  # reused, not rebuilt
    ids[:4] = ids[:4].flip(0)  # same tensor, new contents (its version changes)
    ids[4] = ids[-1]  # a slot of another request: a different answer
    assert_attention_close(
        *reference.slot_attention(q, cq, kv, ids, cs),
        *naive.slot_attention(q, cq, kv, ids, cs),
        torch.float32,
    )
    assert reference._decode_cache.entries[0][-1] is not first


def test_decode_index_of_inference_tensors_follows_in_place_changes():
    """Inference tensors have no version counter: an in-place change is still seen."""
    with torch.inference_mode():
        q, cq, kv, ids, cs = cases.slot_case([1, 1], [6, 3], 4, 2, 8, torch.float32, seed=11)
        ids, cs = ids.clone(), cs.clone()
        reference.slot_attention(q, cq, kv, ids, cs)
        ids[0] = ids[-1]
        assert_attention_close(
            *reference.slot_attention(q, cq, kv, ids, cs),
            *naive.slot_attention(q, cq, kv, ids, cs),
            torch.float32,
        )


def test_slot_attention_many_queries_path(tiling):
    """A request with more queries than FEW_Q takes the blockwise path with gathered keys."""
    q, cq, kv, ids, cs = cases.slot_case([70, 1], [300, 9], 8, 4, 32, torch.float32, seed=9)
    assert_attention_close(
        *reference.slot_attention(q, cq, kv, ids, cs),
        *naive.slot_attention(q, cq, kv, ids, cs),
        torch.float32,
    )


def test_int32_slot_ids_and_positions():
    q, cq, kv, ids, cs = cases.slot_case([1, 1], [3, 4], 2, 1, 8, torch.float32, seed=2)
    o, lse = reference.slot_attention(q, cq, kv, ids.int(), cs)
    assert_attention_close(o, lse, *naive.slot_attention(q, cq, kv, ids, cs), torch.float32)


def test_long_sequence_8k_on_sampled_rows():
    """An 8K-token causal prefill (P = 2 striped ring step, GQA 4) against the dense
    ground truth on 64 sampled query rows (the dense truth of all rows would need the
    full score matrix, which is what the blockwise path avoids)."""
    q, k, v, qp, kp, cq, ck = cases.striped_step([16384], 2, 1, 0, 4, 1, 32, torch.bfloat16, seed=5)
    o, lse = reference.varlen_attention(q, k, v, qp, kp, cq, ck)
    rows = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))[:64]
    rows = torch.cat([rows, torch.tensor([0, q.shape[0] - 1])])
    o_ref, lse_ref = naive.attend(q[rows], k, v, qp[rows, None] >= kp[None, :], q.shape[2] ** -0.5)
    assert_attention_close(o[rows], lse[rows], o_ref, lse_ref, torch.bfloat16)


def test_input_validation():
    q, k, v, qp, kp, cq, ck = cases.striped_step([5], 1, 0, 0, 4, 3, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        reference.varlen_attention(q, k, v, qp, kp, cq, ck)
    q, k, v, qp, kp, cq, ck = cases.striped_step([5], 1, 0, 0, 4, 2, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        reference.varlen_attention(q, k, v, qp, kp, cq, torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype|share"):
        reference.varlen_attention(q, k.half(), v.half(), qp, kp, cq, ck)


def test_fully_masked_tiles_are_skipped(monkeypatch):
    """Causal prefill of 256 tokens in 16x16 tiles: only tiles on or below the diagonal
    reach the engine (about half the score matrix), and only diagonal ones carry a mask."""
    monkeypatch.setattr(reference, "BLOCK_Q", 16)
    monkeypatch.setattr(reference, "BLOCK_K", 16)
    monkeypatch.setattr(reference, "FEW_Q", 0)
    calls = []
    engine = reference._engine

    def counting(q, k, v, scale, mask):
        calls.append((q.shape[2] * k.shape[2], mask if isinstance(mask, str) else type(mask).__name__))
        return engine(q, k, v, scale, mask)

    monkeypatch.setattr(reference, "_engine", counting)
    n = 256
    q, k, v, qp, kp, cq, ck = cases.striped_step([n], 1, 0, 0, 2, 2, 16, torch.float32, seed=0)
    reference.varlen_attention(q, k, v, qp, kp, cq, ck)
    assert sum(c for c, _ in calls) == n * n // 2 + n * 16 // 2  # lower half + diagonal tiles
    assert sorted({kind for _, kind in calls}, key=str) == ["NoneType", "causal"]
