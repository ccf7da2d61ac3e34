"""KVPool bookkeeping: slots are never lost, doubled, or over-allocated."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esp_core.runtime.kv_pool import KVPool, KVPoolFullError


def _pool(slots: int = 16) -> KVPool:
    return KVPool(
        num_layers=2, num_slots=slots, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu"
    )


def test_shape_and_layer_view():
    pool = _pool(10)
    assert pool.kv.shape == (2, 10, 2, 2, 4)
    layer = pool.layer(1)
    layer[3, 0] = 1.0
    assert pool.kv[1, 3, 0].eq(1.0).all()


def test_allocate_any_positions_then_free():
    pool = _pool(16)
    s1 = pool.allocate("a", [7, 2, 9])
    s2 = pool.allocate("b", range(4))
    s3 = pool.allocate("a", torch.tensor([100]))
    assert len(set(s1.tolist() + s2.tolist() + s3.tolist())) == 8
    assert pool.slots_of("a").tolist() == s1.tolist() + s3.tolist()
    assert pool.positions_of("a") == [7, 2, 9, 100]
    assert pool.num_free_slots == 8 and sorted(pool.requests()) == ["a", "b"]
    assert pool.free("a") == 4
    assert pool.num_free_slots == 12 and pool.requests() == ["b"]
    assert pool.slots_of("a").numel() == 0
    pool.check_invariants()


def test_full_pool_raises_and_allocates_nothing():
    pool = _pool(4)
    pool.allocate("a", [0, 1, 2])
    with pytest.raises(KVPoolFullError, match="needs 2 slots, 1 of 4 free"):
        pool.allocate("b", [0, 1])
    assert pool.num_free_slots == 1 and pool.requests() == ["a"]
    pool.check_invariants()


def test_duplicate_positions_are_refused():
    pool = _pool(8)
    pool.allocate("a", [0, 1])
    with pytest.raises(ValueError, match="already have KV slots"):
        pool.allocate("a", [1, 2])
    with pytest.raises(ValueError, match="already have KV slots"):
        pool.allocate("b", [5, 5])
    assert pool.num_free_slots == 6 and pool.requests() == ["a"]
    pool.check_invariants()


def test_free_positions_keeps_the_rest():
    pool = _pool(8)
    slots = pool.allocate("a", [0, 1, 2, 3]).tolist()
    assert pool.free_positions("a", [1, 3]) == 2
    assert pool.positions_of("a") == [0, 2]
    assert pool.slots_of("a").tolist() == [slots[0], slots[2]]
    pool.allocate("a", [1])  # a freed position can be stored again
    assert pool.free_positions("a", [0, 1, 2]) == 3
    assert pool.requests() == [] and pool.num_free_slots == 8
    pool.check_invariants()


def test_slots_of_grows_in_place_and_earlier_tensors_keep_their_slots():
    """Decode appends one slot per step to the request's slot tensor; a tensor returned
    before still lists the slots of its time, and removals rebuild it."""
    pool = _pool(64)
    first = pool.allocate("a", [0, 1, 2]).tolist()
    before = pool.slots_of("a")
    added = [pool.allocate_ids("a", [p])[0] for p in range(3, 40)]  # grows past 2x twice
    assert before.tolist() == first
    assert pool.slots_of("a").tolist() == first + added
    pool.free_positions("a", [1, 5])
    assert pool.slots_of("a").tolist() == [s for i, s in enumerate(first + added) if i not in (1, 5)]
    again = pool.allocate("a", [1]).tolist()
    assert pool.slots_of("a").tolist()[-1:] == again
    pool.check_invariants()
    with torch.inference_mode():  # the engine runs under inference mode; the pool keeps working
        pool.allocate("a", [5])
        pool.allocate("b", [0])
        assert pool.slots_of("b").numel() == 1
    pool.allocate("b", [1])
    pool.check_invariants()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 6), st.booleans()), max_size=30))
def test_random_operations_keep_invariants(ops):
    pool = _pool(12)
    held: dict[str, set[int]] = {}
    next_pos = {r: 0 for r in "abc"}
    for rid, n, do_free in ops:
        if do_free:
            assert pool.free(rid) == len(held.pop(rid, set()))
        else:
            positions = list(range(next_pos[rid], next_pos[rid] + n))
            if n > pool.num_free_slots:
                with pytest.raises(KVPoolFullError):
                    pool.allocate(rid, positions)
            else:
                pool.allocate(rid, positions)
                pool.slots_of(rid)  # kept from now on: later allocations append to it
                held.setdefault(rid, set()).update(positions)
                next_pos[rid] += n
        pool.check_invariants()
        assert pool.num_free_slots == 12 - sum(len(v) for v in held.values())
        for r, pos in held.items():
            assert set(pool.positions_of(r)) == pos


def test_adopt_renames_the_prefix_slots_and_frees_the_rest():
    pool = _pool(16)
    slots = pool.allocate("entry", [4, 0, 9, 2, 7])
    pool.layer(0)[slots] = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1)
    assert pool.adopt("entry", "new", 5) == 3  # positions 0, 2, 4 stay, in place
    assert pool.requests() == ["new"] and pool.num_free_slots == 13
    assert sorted(pool.positions_of("new")) == [0, 2, 4]
    kept = dict(zip(pool.positions_of("new"), pool.slots_of("new").tolist()))
    assert kept == {4: slots[0].item(), 0: slots[1].item(), 2: slots[3].item()}  # no copy
    pool.allocate("new", [5, 6])  # the adopter continues where the prefix ends
    pool.check_invariants()
    with pytest.raises(ValueError):
        pool.adopt("other", "new", 3)


def test_share_prefix_lists_the_same_slots_and_frees_them_with_the_last_holder():
    pool = _pool(16)
    slots = pool.allocate("entry", [3, 0, 1, 2])
    pool.kv[:, slots] = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1, 1)
    assert pool.share_prefix("entry", "reader", 3) == 3
    assert pool.share_prefix("entry", "other", 3) == 3
    assert pool.num_tokens_of("reader") == 3 and pool.num_free_slots == 12  # no new slot
    got = dict(zip(pool.positions_of("reader"), pool.kv[0, pool.slots_of("reader"), 0, 0, 0].tolist()))
    assert got == {0: 1.0, 1: 2.0, 2: 3.0}
    pool.allocate("reader", [3])  # its own position 3, beside the shared ones
    pool.check_invariants()
    assert pool.free("entry") == 4 and pool.num_free_slots == 12  # only entry's position 3 goes
    pool.free("reader")
    assert pool.num_free_slots == 13  # "other" still lists the shared slots
    pool.free("other")
    assert pool.num_free_slots == 16
    pool.check_invariants()
    pool.allocate("x", [0])
    with pytest.raises(ValueError):
        pool.share_prefix("x", "x", 1)  # into a request that holds slots already
