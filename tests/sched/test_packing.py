"""Decode packing: short prompts join a running one-instance decode group at admission.

Hand-made arrivals on a fake clock (`fake_clock.run` checks invariants and every plan)."""

import pytest

from esp_core.sched.plan import PrefillBatch

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
    # the group's step with "b" would exceed 1.05x the slower of the two steps it
    # replaces ("a"'s alone, "b"'s on an idle instance): both hold long KV
    arrivals = [(0.0, req("a", 20_000, 200, 0.0)), (0.5, req("b", 8_000, 200, 0.5))]
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


# a CPU-like decode step: a fixed cost 12x a row's (in process, a 32-row step is ~3.8x a
# 1-row one), so a full group's step is several lone steps
CPU_A, CPU_B = 4.9e-3, 0.41e-3


def _cpu_like(decode_a: float = CPU_A, **cfg):
    from esp_core.sched.config import ESPSchedulerConfig
    from esp_core.sched.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs
    from esp_core.sched.hardware import HardwareSpec
    from esp_core.sched.interface import ClusterSpec
    from esp_core.sched.model_shape import ModelShape
    from esp_core.sched.scheduler import ESPScheduler

    cost = CostModel.analytical(ModelShape.builtin_tiny(), HardwareSpec.preset("cpu"))
    cost.decode_table[1] = DecodeCoeffs(decode_a, CPU_B, 1e-8)
    cost.prefill_table[(1, 1)] = PrefillCoeffs(5e-3, 1e-4, 1e-8)
    return ESPScheduler(ClusterSpec(4, 50_000), cost, ESPSchedulerConfig(pack_decode=True, **cfg))


def _cpu_step(batch) -> float:
    if isinstance(batch, PrefillBatch):
        return 5e-3 + 1e-4 * batch.num_tokens
    return CPU_A + CPU_B * len(batch.items)


def _burst(n: int, gap_s: float):
    return [(i * gap_s, req(f"r{i}", 32, 64, i * gap_s)) for i in range(n)]


@pytest.mark.parametrize("gap_s", [0.0005, 0.002, 0.01])
def test_a_burst_on_a_cpu_like_step_decodes_on_one_instance(gap_s):
    # 32 arrivals a few ms apart: the later ones wait for the first ones' prefill or the
    # group's step instead of starting groups of their own, and the group is not capped
    # at twice a lone request's step (~13 rows here)
    s = _cpu_like()
    res = run(s, _burst(32, gap_s), keep_plans=True, step_time=_cpu_step)
    assert all(len(res.tokens[f"r{i}"]) == 64 for i in range(32))
    decodes = _decodes(res)
    assert len({b.instances for b in decodes}) == 1
    assert max(len(b.items) for b in decodes) == 32


def test_without_the_hold_a_trickling_burst_starts_several_groups():
    s = _cpu_like(pack_hold_s=0.0)
    res = run(s, _burst(32, 0.002), keep_plans=True, step_time=_cpu_step)
    assert all(len(res.tokens[f"r{i}"]) == 64 for i in range(32))
    assert len({b.instances for b in _decodes(res)}) > 1


@pytest.mark.parametrize(("hold_s", "groups"), [(0.1, 2), (0.6, 1)])
def test_a_round_is_held_only_within_pack_hold_s(hold_s, groups):
    # "b" arrives while "a"'s 0.5 s step runs (the cost model knows it takes that long):
    # held for it within pack_hold_s after its own prefill would have ended, else it
    # starts a group on an idle instance
    s = _cpu_like(pack_hold_s=hold_s, decode_a=0.5)

    def step(batch) -> float:
        return _cpu_step(batch) if isinstance(batch, PrefillBatch) else 0.5

    arrivals = [(0.0, req("a", 32, 4, 0.0)), (0.1, req("b", 32, 4, 0.1))]
    res = run(s, arrivals, keep_plans=True, step_time=step)
    assert len(res.tokens["a"]) == 4 and len(res.tokens["b"]) == 4
    assert len({b.instances for b in _decodes(res)}) == groups
