"""Decode packing: short prompts join a running one-instance decode group at admission.

Hand-made arrivals on a fake clock (`fake_clock.run` checks invariants and every plan)."""

from .fake_clock import a800_scheduler as make
from .fake_clock import decode_batches as _decodes
from .fake_clock import prompt_request as req
from .fake_clock import run

# "b" arrives while "a" decodes alone on one instance, three instances idle
ARRIVALS = [(0.0, req("a", 300, 200, 0.0)), (0.5, req("b", 200, 200, 0.5))]


def test_a_short_prompt_joins_the_running_group_instead_of_an_idle_instance():
    s = make(pack_decode=True)
    res = run(s, ARRIVALS, keep_plans=True)
    assert len(res.tokens["a"]) == 200 and len(res.tokens["b"]) == 200
    assert s.stats["packed_prefills"] == 1
    decodes = _decodes(res)
    # every step of both runs on the one instance "a" was prefilled on
    assert len({b.instances for b in decodes}) == 1
    both = [b for b in decodes if {it.request_id for it in b.items} == {"a", "b"}]
    assert len(both) >= 90  # ("a" is half done when "b" arrives)
    # "b" was prefilled there too, no migration
    prefills = [b for p in res.plans for b in p.prefills]
    assert len(prefills) == 2 and prefills[1].instances == decodes[0].instances
    assert not [m for p in res.plans for m in p.migrations]


def test_without_packing_the_short_prompt_decodes_on_an_idle_instance():
    s = make()
    res = run(s, ARRIVALS, keep_plans=True)
    assert s.stats["packed_prefills"] == 0
    assert len({b.instances for b in _decodes(res)}) == 2


def test_no_packing_beyond_the_step_bound():
    # the group's step with "b" would exceed 1.05x a lone request's step (long KV)
    arrivals = [(0.0, req("a", 20_000, 200, 0.0)), (0.5, req("b", 200, 200, 0.5))]
    s = make(pack_decode=True, pack_step_slowdown=1.05)
    res = run(s, arrivals, keep_plans=True)
    assert s.stats["packed_prefills"] == 0
    assert len(res.tokens["b"]) == 200
    assert len({b.instances for b in _decodes(res)}) == 2


def test_no_packing_without_room_for_both_groups_remaining_tokens():
    s = make(4, 700, pack_decode=True)
    res = run(s, ARRIVALS, keep_plans=True)
    assert s.stats["packed_prefills"] == 0
    assert len(res.tokens["b"]) == 200


def test_a_burst_with_no_group_to_join_decodes_on_one_idle_instance():
    burst = [(0.0, req(f"r{i}", 200, 50, 0.0)) for i in range(6)]
    s = make(pack_decode=True)
    res = run(s, burst, keep_plans=True)
    assert all(len(res.tokens[f"r{i}"]) == 50 for i in range(6))
    assert s.stats["packed_prefills"] == 1
    assert len({b.instances for b in _decodes(res)}) == 1
    assert max(len(b.items) for b in _decodes(res)) == 6
    # unpacked, the batching DP spreads the same burst over several instances
    s = make()
    res = run(s, burst, keep_plans=True)
    assert len({b.instances for b in _decodes(res)}) > 1
