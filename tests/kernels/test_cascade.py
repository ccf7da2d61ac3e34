"""Shared-prefix (cascade) slot attention: equal to per-request slot attention, each shared
prefix read once; the grouping found from host slot lists, with or without hints."""

from __future__ import annotations

import pytest
import torch

from esp_serve.kernels import api as kernels
from esp_serve.kernels.cascade import CascadeLayout, cascade_slot_attention, shared_prefix_groups
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close


def _lists(gen: torch.Generator, pool: int) -> list[list[int]]:
    """Slot lists of 7 requests: a document of 40 slots read by 3 (one of them holding
    nothing past it), a second of 25 read by 2 of which one read only its first 10 (a
    shorter share), and one request sharing nothing."""
    perm = torch.randperm(pool, generator=gen).tolist()
    take = iter(perm)

    def fresh(n: int) -> list[int]:
        return [next(take) for _ in range(n)]

    doc_a, doc_b = fresh(40), fresh(25)
    return [
        doc_a + fresh(9),
        doc_a + fresh(3),
        fresh(17),
        doc_b + fresh(5),
        list(doc_a),
        doc_b[:10] + fresh(6),
        doc_b + fresh(1),
    ]


def _per_request(q, cq, kv, lists):
    ids = torch.tensor([s for x in lists for s in x], dtype=torch.int64)
    return kernels.slot_attention(q, cq, kv, ids, cases.cu([len(x) for x in lists]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_queries", [[1] * 7, [1, 3, 1, 2, 1, 1, 4]])
def test_cascade_equals_per_request_attention(dtype, n_queries):
    gen = torch.Generator().manual_seed(3)
    pool = 200
    lists = _lists(gen, pool)
    kv = torch.randn(pool, 2, 2, 16, generator=gen).to(dtype)  # GQA: 8 query heads, 2 KV heads
    q = torch.randn(sum(n_queries), 8, 16, generator=gen).to(dtype)
    cq = cases.cu(n_queries)
    layout = CascadeLayout.build(lists, n_queries, torch.device("cpu"))
    assert layout is not None
    # doc_a read by 3 (40 slots saved twice), doc_b's first 10 by 3, its 25 not (a group
    # has one prefix: the members' common one)
    assert layout.shared_slots == 2 * 40 + 2 * 10
    o, lse = cascade_slot_attention(q, cq, kv, layout)
    o_ref, lse_ref = _per_request(q, cq, kv, lists)
    assert o.dtype == dtype
    assert_attention_close(o, lse, o_ref.float(), lse_ref, dtype)


def test_groups_by_first_slot_and_common_prefix():
    lists = [[5, 6, 7, 8], [5, 6, 9], [1, 2], [5, 6, 7], [1, 3], [4]]
    assert shared_prefix_groups(lists) == [(2, [0, 1, 3]), (1, [2, 4])]
    assert shared_prefix_groups(lists, min_shared=2) == [(2, [0, 1, 3])]
    # hints bound the search (0: not a reader); a bound past the truth is checked
    assert shared_prefix_groups(lists, hints=[3, 0, 0, 3, 0, 0]) == [(3, [0, 3])]
    assert shared_prefix_groups(lists, hints=[9, 9, 0, 9, 0, 0]) == [(2, [0, 1, 3])]
    assert CascadeLayout.build([[1, 2], [3, 4]], [1, 1], torch.device("cpu")) is None


def test_a_request_made_only_of_the_prefix_and_empty_rest():
    """Readers holding nothing past the shared slots get an empty rest partial (lse =
    -inf) that the merge ignores."""
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(50, 2, 4, 8, generator=gen)
    lists = [list(range(10, 30)), list(range(10, 30))]
    q = torch.randn(2, 4, 8, generator=gen)
    layout = CascadeLayout.build(lists, [1, 1], torch.device("cpu"))
    assert layout is not None and layout.rest_slots.numel() == 0
    o, lse = cascade_slot_attention(q, cases.cu([1, 1]), kv, layout)
    o_ref, lse_ref = _per_request(q, cases.cu([1, 1]), kv, lists)
    assert_attention_close(o, lse, o_ref, lse_ref, torch.float32)
