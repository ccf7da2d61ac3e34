"""merge_partials (torch path): exact recombination of split attention, guarded -inf."""

from __future__ import annotations

import pytest
import torch

from esp_serve.kernels import api as kernels
from esp_serve.kernels import naive
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close


def _split_slots(n_slots, parts, gen):
    """Random partition of each request's slots into `parts` subsets (some empty)."""
    owner = [torch.randint(0, parts, (n,), generator=gen) for n in n_slots]
    return owner


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_disjoint_partials_equals_whole(parts, dtype):
    """Multi-master decode: each holder attends to its subset of a request's tokens; the
    merge of the holders' partials equals attention over all tokens."""
    gen = torch.Generator().manual_seed(parts)
    n_q, n_s = [1, 1, 1, 2, 1], [9, 1, 0, 30, 4]
    q, cq, kv, ids, cs = cases.slot_case(n_q, n_s, 8, 2, 16, dtype, seed=parts)
    owner = _split_slots(n_s, parts, gen)
    outs, lses = [], []
    for p in range(parts):
        sub = [ids[cs[b] : cs[b + 1]][owner[b] == p] for b in range(len(n_s))]
        o, lse = kernels.slot_attention(q, cq, kv, torch.cat(sub), cases.cu([len(s) for s in sub]))
        outs.append(o.float())  # partials travel in fp32
        lses.append(lse)
    o, lse = kernels.merge_partials(outs, lses)
    o_ref, lse_ref = naive.slot_attention(q, cq, kv, ids, cs)
    assert_attention_close(o.to(dtype), lse, o_ref, lse_ref, dtype)


def test_empty_partials_are_ignored_even_with_garbage():
    gen = torch.Generator().manual_seed(0)
    o1, l1 = torch.randn(6, 4, 8, generator=gen), torch.randn(6, 4, generator=gen)
    o2 = torch.full((6, 4, 8), float("nan"))  # an uninitialised buffer
    l2 = torch.full((6, 4), float("-inf"))
    o, lse = kernels.merge_partials([o1, o2], [l1, l2])
    torch.testing.assert_close(o, o1, atol=0, rtol=0)
    torch.testing.assert_close(lse, l1, atol=0, rtol=0)
    o, lse = kernels.merge_partials([o2, o2], [l2, l2])  # no keys anywhere
    assert (o == 0).all() and torch.isneginf(lse).all()


def test_merge_matches_naive_rule_and_is_order_free():
    gen = torch.Generator().manual_seed(1)
    outs = [torch.randn(5, 3, 8, generator=gen) for _ in range(4)]
    lses = [torch.randn(5, 3, generator=gen) * 30 for _ in range(4)]  # far-apart scales
    lses[2][1:3] = float("-inf")
    o, lse = kernels.merge_partials(outs, lses)
    o_ref, lse_ref = naive.merge_partials(outs, lses)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
    o_rev, lse_rev = kernels.merge_partials(outs[::-1], lses[::-1])
    torch.testing.assert_close(o_rev, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_rev, lse, atol=1e-5, rtol=1e-5)
