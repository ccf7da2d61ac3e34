"""Property tests: random workloads through ESPScheduler with a fake clock.

For every example: KV never over-committed (invariants after every event), every plan
consistent with the state it was planned from (`check_plan`), every admitted request
finishes exactly once, the pool is fully free at the end (with a prefix cache: but for
the entries' KV, shared slots counted once)."""

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.interface import ClusterSpec, FinishReason
from esp_core.sched.model_shape import ModelShape
from esp_core.sched.plan import NewRequest, PrefillBatch, SamplingParams
from esp_core.sched.prefix_cache import block_hash_chain
from esp_core.sched.scheduler import ESPScheduler

from .fake_clock import run

COST = CostModel.default_a800()
EOS = 2

# chunked prefill with short chunks, the base of the variants below
CHUNKED = dict(eos_token_ids=(EOS,), chunked_prefill=True, chunk_tokens=300)

CONFIGS = {
    "esp": ESPSchedulerConfig(eos_token_ids=(EOS,)),
    "esp-nogain": ESPSchedulerConfig(eos_token_ids=(EOS,), gain_vs_delay=False, headroom_tokens=0),
    "esp-chunked": ESPSchedulerConfig(**CHUNKED, long_request_max_wait_s=0.05),
    # small decode groups merge (KV migrated onto another group's instance)
    "esp-chunked-merge": ESPSchedulerConfig(
        **CHUNKED, long_request_max_wait_s=0.05, adaptive_chunking=True, merge_decode_groups=True
    ),
    # long prompts go whole while no short is around (a short window, so it flips often)
    "esp-chunked-whole": ESPSchedulerConfig(
        **CHUNKED,
        long_request_max_wait_s=0.05,
        adaptive_chunking=True,
        whole_prompts_without_shorts=True,
        short_activity_window_s=0.02,
    ),
    # short prompts packed onto running one-instance decode groups (or held for one)
    "esp-chunked-pack": ESPSchedulerConfig(
        **CHUNKED, long_request_max_wait_s=0.05, pack_decode=True, pack_step_slowdown=3.0
    ),
    # long prompts' starts: lookahead, minimum rings, budget chunks on the shorts'
    # instance, aging off
    "esp-chunked-starts": ESPSchedulerConfig(
        **CHUNKED,
        adaptive_chunking=True,
        long_start_lookahead=True,
        backlog_min_ring=True,
        reserved_budget_chunks=True,
        long_request_max_wait_s=1e6,
    ),
    # chunked prompts' rings widen between chunks (cached KV migrated), beside merges;
    # run on `long_workloads` (widening pays only for prompts of many thousand tokens)
    "esp-chunked-widen": ESPSchedulerConfig(
        eos_token_ids=(EOS,),
        chunked_prefill=True,
        chunk_tokens=4000,
        long_request_max_wait_s=0.05,
        widen_chunk_ring=True,
        merge_decode_groups=True,
    ),
    "esp-pack-cache": ESPSchedulerConfig(
        **CHUNKED, prefix_cache=True, prefix_block_tokens=16, pack_decode=True
    ),
    "esp-tinydp": ESPSchedulerConfig(
        eos_token_ids=(EOS,), dp_max_request_groups=2, dp_max_batch_groups=2, max_skip_ahead=0
    ),
    "loongserve": ESPSchedulerConfig.loongserve("mixed", eos_token_ids=(EOS,)),
    # decode look-ahead: a one-instance group's next step planned while its step runs
    "esp-lookahead": ESPSchedulerConfig(eos_token_ids=(EOS,), decode_lookahead=True),
    "esp-chunked-pack-lookahead": ESPSchedulerConfig(
        **CHUNKED, long_request_max_wait_s=0.05, pack_decode=True, decode_lookahead=True
    ),
    "esp-cache-lookahead": ESPSchedulerConfig(
        **CHUNKED, prefix_cache=True, prefix_block_tokens=16, pack_decode=True, decode_lookahead=True
    ),
    # every prompt is one token repeated: all share prefixes, concurrent readers share KV
    "esp-cache": ESPSchedulerConfig(**CHUNKED, prefix_cache=True, prefix_block_tokens=16),
    # wide decode groups gather their KV onto fewer instances (on CPU_COST, where wide
    # steps cost): alone, and with the server's prefix cache, packing and look-ahead
    "esp-chunked-narrow": ESPSchedulerConfig(
        **CHUNKED, long_request_max_wait_s=0.05, narrow_decode_groups=True, merge_decode_groups=True
    ),
    "esp-cache-narrow": ESPSchedulerConfig(
        **CHUNKED,
        prefix_cache=True,
        prefix_block_tokens=16,
        pack_decode=True,
        decode_lookahead=True,
        narrow_decode_groups=True,
    ),
}
CACHED = ("esp-cache", "esp-pack-cache", "esp-cache-lookahead", "esp-cache-narrow")
# the CPU preset: each instance a decode step spans beyond the first costs ~1 ms a layer
CPU_COST = CostModel.analytical(ModelShape.builtin_tiny(), HardwareSpec.cpu())
COSTS = {"esp-chunked-narrow": CPU_COST, "esp-cache-narrow": CPU_COST}


@st.composite
def workloads(draw):
    n_inst = draw(st.integers(1, 6))
    slots = draw(st.integers(64, 3000))
    n_req = draw(st.integers(1, 14))
    reqs = []
    for i in range(n_req):
        t = draw(st.floats(0.0, 0.2, allow_nan=False))
        prompt = draw(st.integers(1, min(2 * slots, 4000)))
        max_tokens = draw(st.integers(1, 30))
        sp = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=draw(st.booleans()),
            min_tokens=draw(st.integers(0, 3)),
            stop_token_ids=draw(st.sampled_from([(), (7,)])),
        )
        reqs.append((t, NewRequest(f"r{i}", tuple([5] * prompt), sp, t)))
    aborts = []
    if draw(st.booleans()) and reqs:
        victim = draw(st.integers(0, n_req - 1))
        aborts.append((draw(st.floats(0.0, 0.3, allow_nan=False)), f"r{victim}"))
    tokens = draw(st.lists(st.sampled_from([EOS, 7, 11, 13, 17, 19]), min_size=8, max_size=8))
    return n_inst, slots, reqs, aborts, tokens


@st.composite
def long_workloads(draw):
    """`workloads` with pools and prompts 20x larger: long prompts of many chunks."""
    n_inst, slots, reqs, aborts, tokens = draw(workloads())
    scaled = [(t, dataclasses.replace(r, prompt_token_ids=r.prompt_token_ids * 20)) for t, r in reqs]
    return n_inst, 20 * slots, scaled, aborts, tokens


def _step_time(b):
    if isinstance(b, PrefillBatch):
        return 0.004 + 2e-6 * b.num_tokens / b.dop
    return 0.002 + 1e-4 * len(b.items)


def _check(policy, wl):
    n_inst, slots, reqs, aborts, tokens = wl
    s = ESPScheduler(ClusterSpec(n_inst, slots), COSTS.get(policy, COST), CONFIGS[policy])
    if policy in CACHED:
        reqs = [
            (t, dataclasses.replace(r, block_hashes=block_hash_chain(r.prompt_token_ids, 16)))
            for t, r in reqs
        ]
    res = run(
        s,
        reqs,
        aborts=aborts,
        step_time=_step_time,
        token_fn=lambda rid, k: tokens[(k + int(rid[1:])) % len(tokens)],
    )
    admitted = {r.request_id for _, r in reqs} - set(res.rejected)
    assert set(res.finishes) == admitted
    for code in res.rejected.values():
        assert code == "context_length_exceeded"
    by_id = {r.request_id: r for _, r in reqs}
    for rid, reason in res.finishes.items():
        out = res.tokens.get(rid, [])
        sp = by_id[rid].sampling
        assert len(out) <= sp.max_tokens
        if reason == FinishReason.LENGTH:
            assert len(out) == sp.max_tokens
        if reason == FinishReason.STOP:
            assert out[-1] in sp.stop_token_ids or (out[-1] == EOS and not sp.ignore_eos)
            assert len(out) >= sp.min_tokens
    cached = s.cached_kv_per_instance()  # (all zero without a prefix cache)
    assert [free + c for free, c in zip(s.kv_free_slots(), cached)] == [slots] * n_inst
    assert not s.has_unfinished()
    assert not s.requests  # finished requests are forgotten
    return res


SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(workloads())
def test_esp_random_workloads(wl):
    _check("esp", wl)


@SETTINGS
@given(workloads())
def test_esp_without_gain_rule_random_workloads(wl):
    _check("esp-nogain", wl)


@SETTINGS
@given(workloads())
def test_esp_chunked_random_workloads(wl):
    _check("esp-chunked", wl)


@SETTINGS
@given(workloads())
def test_esp_chunked_decode_merges_random_workloads(wl):
    _check("esp-chunked-merge", wl)


@SETTINGS
@given(workloads())
def test_esp_chunked_whole_prompts_without_shorts_random_workloads(wl):
    _check("esp-chunked-whole", wl)


@SETTINGS
@given(workloads())
def test_esp_chunked_long_starts_random_workloads(wl):
    _check("esp-chunked-starts", wl)


@SETTINGS
@given(long_workloads())
def test_esp_chunked_widening_random_workloads(wl):
    _check("esp-chunked-widen", wl)


@SETTINGS
@given(workloads())
def test_esp_chunked_decode_packing_random_workloads(wl):
    _check("esp-chunked-pack", wl)


@SETTINGS
@given(workloads())
def test_esp_decode_packing_prefix_cache_random_workloads(wl):
    _check("esp-pack-cache", wl)


@SETTINGS
@given(workloads())
def test_esp_bounded_dp_random_workloads(wl):
    _check("esp-tinydp", wl)


@SETTINGS
@given(workloads())
def test_loongserve_random_workloads(wl):
    _check("loongserve", wl)


@SETTINGS
@given(workloads())
def test_esp_prefix_cache_shared_kv_random_workloads(wl):
    _check("esp-cache", wl)


@SETTINGS
@given(workloads())
def test_esp_decode_lookahead_random_workloads(wl):
    on = _check("esp-lookahead", wl)
    _, _, _, aborts, _ = wl
    if not aborts:  # (an abort at a fixed time lands elsewhere in a faster pipeline)
        off = _check("esp", wl)
        assert on.tokens == off.tokens and on.finishes == off.finishes


@SETTINGS
@given(workloads())
def test_esp_chunked_packing_decode_lookahead_random_workloads(wl):
    _check("esp-chunked-pack-lookahead", wl)


@SETTINGS
@given(workloads())
def test_esp_prefix_cache_decode_lookahead_random_workloads(wl):
    _check("esp-cache-lookahead", wl)


@SETTINGS
@given(workloads())
def test_esp_chunked_decode_narrowing_random_workloads(wl):
    _check("esp-chunked-narrow", wl)


@SETTINGS
@given(workloads())
def test_esp_prefix_cache_decode_narrowing_random_workloads(wl):
    _check("esp-cache-narrow", wl)
