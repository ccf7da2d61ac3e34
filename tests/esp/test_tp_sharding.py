"""Which slices a TP rank holds, and loading only those slices from safetensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esp_core.runtime.tensor_parallel import TPContext, kv_head_range, vocab_range, weight_slices
from esp_core.runtime.tp_shapes import check_tp_size, local_arch
from esp_core.runtime.weights import load_hf_checkpoint
from tests.support.esp import save_tiny_model, tiny_arch


def test_kv_heads_split_or_replicate():
    many = tiny_arch(num_heads=8, num_kv_heads=8)
    assert [kv_head_range(many, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    few = tiny_arch(num_heads=8, num_kv_heads=2)
    # fewer KV heads than ranks: ranks 0-1 share head 0, ranks 2-3 head 1 (their query groups)
    assert [kv_head_range(few, r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    shard = local_arch(few, 4)
    assert (shard.num_heads, shard.num_kv_heads, shard.intermediate_size) == (
        2,
        1,
        few.intermediate_size // 4,
    )
    assert local_arch(few, 1) is few


@pytest.mark.parametrize(
    "kw, size, what",
    [
        (dict(num_heads=6, num_kv_heads=6), 4, "num_heads"),
        (dict(num_heads=12, num_kv_heads=3), 2, "num_kv_heads"),
    ],
)
def test_uneven_splits_are_refused(kw, size, what):
    with pytest.raises(ValueError, match=what):
        check_tp_size(tiny_arch(**kw), size)


def test_vocab_chunks_cover_the_vocabulary_once():
    for vocab, size in [(258, 4), (258, 2), (7, 4), (128256, 8)]:
        ranges = [vocab_range(vocab, r, size) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sharded_load_reads_exactly_the_rank_slices(tmp_path, kv_heads):
    path = save_tiny_model(tmp_path / "m", seed=2, num_heads=4, num_kv_heads=kv_heads)
    arch, full = load_hf_checkpoint(path, progress=False)
    arch = dataclasses.replace(arch)
    for rank in range(2):
        tp = TPContext(rank, 2)
        _, part = load_hf_checkpoint(path, progress=False, tp=tp)
        assert set(part) == set(full)
        slices = weight_slices(arch, rank, 2)
        for name, t in part.items():
            sl = slices.get(name)
            want = full[name] if sl is None else full[name].narrow(sl[0], sl[1], sl[2] - sl[1])
            assert torch.equal(t, want), name
        q = part["model.layers.0.self_attn.q_proj.weight"]
        k = part["model.layers.0.self_attn.k_proj.weight"]
        assert q.shape[0] == 2 * arch.head_dim and k.shape[0] == arch.head_dim
