"""Decode merges: small one-instance decode groups move onto another's instance.

Hand-made arrivals on a fake clock (`fake_clock.run` checks invariants and every plan)."""

from .fake_clock import a800_scheduler as make
from .fake_clock import decode_batches as _decodes
from .fake_clock import prompt_request as req
from .fake_clock import run

# two short requests arriving one after the other: each prefilled alone on its own
# instance, so each starts decoding as its own one-instance group
ARRIVALS = [(0.0, req("a", 300, 200, 0.0)), (0.001, req("b", 200, 200, 0.001))]


def test_two_one_request_groups_merge_onto_one_instance():
    s = make(merge_decode_groups=True)
    res = run(s, ARRIVALS, keep_plans=True)
    assert len(res.tokens["a"]) == 200 and len(res.tokens["b"]) == 200
    assert s.stats["decode_merges"] == 1
    moves = [m for p in res.plans for m in p.migrations]
    assert {m.request_id for m in moves} == {"b"} or {m.request_id for m in moves} == {"a"}
    both = [b for b in _decodes(res) if {it.request_id for it in b.items} == {"a", "b"}]
    assert len(both) >= 190  # after the move they step together...
    # ...on one instance: the masters and the new tokens' KV all on the instance moved to
    assert all({it.master for it in b.items} == {it.new_kv_instance for it in b.items} for b in both)
    assert all(len({it.master for it in b.items}) == 1 for b in both)


def test_without_merges_the_groups_step_apart():
    s = make()
    res = run(s, ARRIVALS, keep_plans=True)
    assert s.stats["decode_merges"] == 0
    assert not [b for b in _decodes(res) if len(b.items) == 2]
    assert len(_decodes(res)) >= 2 * 199


def test_no_merge_when_the_move_costs_more_than_the_steps_it_saves():
    # one output token left after the prefill's: nothing to save
    arrivals = [(0.0, req("a", 3000, 2, 0.0)), (0.001, req("b", 3000, 2, 0.001))]
    s = make(merge_decode_groups=True)
    res = run(s, arrivals, keep_plans=True)
    assert s.stats["decode_merges"] == 0
    assert len(res.tokens["a"]) == 2 and len(res.tokens["b"]) == 2
