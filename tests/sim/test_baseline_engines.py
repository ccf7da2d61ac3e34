"""The modelled behaviours of the baseline engines (vLLM 0.3, LightLLM SplitFuse, DistServe):
each test pins one documented behaviour on a small hand-made state."""

import pytest

from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    KVKeep,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    SampledToken,
    SamplingParams,
    TokenRange,
)
from esp_core.sim.baselines import PDDisaggScheduler, vllm_scheduler
from esp_core.sim.baselines.chunked_prefill import chunk_size_for, running_max_for
from esp_core.sim.baselines.vllm import VLLM_ENGINE
from esp_core.sim.kv_ledger import KVLedger
from esp_core.sim.sweep import prescan_start_rate
from esp_core.sim.timing import PROFILE_ENGINE, BatchTimer, ExecutionModel, Topology


def _prefill(lens, start=0, cached=()):
    items = tuple(
        PrefillItem(
            f"r{k}",
            TokenRange(start, start + n),
            0,
            (KVKeep(0, (TokenRange(start, start + n),)),),
            cached_holders=cached,
        )
        for k, n in enumerate(lens)
    )
    return PrefillBatch(0, (0,), items)


def _decode(ledger, n, ctx):
    items = []
    for k in range(n):
        ledger.add(f"d{k}", 0, ctx, "setup")
        items.append(DecodeItem(f"d{k}", 1, ctx, 0, (0,), 0))
    return DecodeBatch(1, (0,), tuple(items))


def _timer(cost_model, engine=PROFILE_ENGINE):
    return BatchTimer(cost_model, Topology(tp=8), engine)


def _req(rid, n, out=10):
    return NewRequest(rid, (1,) * n, SamplingParams(max_tokens=out, ignore_eos=True))


def test_profile_engine_is_the_cost_model(cost_model):
    b = _prefill([1000, 3000])
    assert _timer(cost_model).prefill(b) == pytest.approx(
        cost_model.prefill_time(1, 4000, 1000**2 + 3000**2, 8)
    )


def test_attention_slowdown_scales_only_the_quadratic_term(cost_model):
    b = _prefill([50_000])
    base = _timer(cost_model).prefill(b)
    slow = _timer(cost_model, ExecutionModel(attention_slowdown=2.0)).prefill(b)
    attn = base - cost_model.prefill_time(1, 50_000, 0, 8)
    assert attn > 0
    assert slow == pytest.approx(base + attn)


def test_padded_prefill_computes_every_prompt_at_the_longest_length(cost_model):
    padded = _timer(cost_model, ExecutionModel(padded_prefill=True))
    assert padded.prefill(_prefill([100, 1000])) == pytest.approx(
        _timer(cost_model).prefill(_prefill([1000, 1000]))
    )


def test_host_overhead_is_per_iteration_plus_per_sequence(cost_model):
    eng = ExecutionModel(iteration_overhead_s=0.005, per_seq_overhead_s=0.0002)
    ledger = KVLedger(1, 10**7)
    dec = _decode(ledger, 100, 1000)
    extra = _timer(cost_model, eng).decode(dec, ledger) - _timer(cost_model).decode(dec, ledger)
    assert extra == pytest.approx(0.005 + 100 * 0.0002)


def test_execution_model_refuses_a_faster_than_profile_engine():
    with pytest.raises(ValueError):
        ExecutionModel(attention_slowdown=0.5)
    with pytest.raises(ValueError):
        ExecutionModel(per_seq_overhead_s=-1.0)


def test_splitfuse_chunk_attention_counts_the_prefix(cost_model):
    """A chunk's queries attend to the whole cached prefix: the same 2048-token chunk
    costs more the later it comes in a long prompt, and the SplitFuse engine's slower
    kernel scales that part too."""
    timer = _timer(cost_model)
    first = timer.prefill(_prefill([2048]))
    late = timer.prefill(_prefill([2048], start=200_000, cached=(0,)))
    later = timer.prefill(_prefill([2048], start=400_000, cached=(0,)))
    assert first < late < later
    slow = _timer(cost_model, ExecutionModel(attention_slowdown=1.7))
    cross = late - first
    assert slow.prefill(_prefill([2048], start=200_000, cached=(0,))) - slow.prefill(
        _prefill([2048])
    ) == pytest.approx(1.7 * cross, rel=1e-6)


def test_fused_iteration_pays_host_overhead_for_chunks_and_decodes(cost_model):
    eng = ExecutionModel(per_seq_overhead_s=0.001)
    ledger = KVLedger(1, 10**7)
    dec = _decode(ledger, 10, 500)
    pre = _prefill([256, 256])
    extra = _timer(cost_model, eng).fused(pre, dec, ledger) - _timer(cost_model).fused(pre, dec, ledger)
    assert extra == pytest.approx(12 * 0.001)


def test_vllm_pauses_running_decodes_when_a_prefill_batch_starts():
    sched = vllm_scheduler(ClusterSpec(1, 100_000, 8))
    sched.add_request(_req("a", 500), 0.0)
    plan = sched.schedule(0.0)
    (pre,) = plan.prefills
    sched.update(BatchResult(pre.batch_id, "prefill", pre.instances, (SampledToken("a", 7),)), 0.1)
    plan = sched.schedule(0.1)
    assert plan.decodes and not plan.prefills  # a decodes alone
    (dec,) = plan.decodes
    sched.update(BatchResult(dec.batch_id, "decode", dec.instances, (SampledToken("a", 8),)), 0.2)
    sched.add_request(_req("b", 500), 0.2)
    plan = sched.schedule(0.2)
    assert [it.request_id for p in plan.prefills for it in p.items] == ["b"]
    assert not plan.decodes  # the running decode of a waits for b's prefill


def test_vllm_prefill_batch_stops_at_256_tokens_of_padding():
    sched = vllm_scheduler(ClusterSpec(1, 100_000, 8))
    for rid, n in (("a", 1000), ("b", 900), ("c", 100)):
        sched.add_request(_req(rid, n), 0.0)
    plan = sched.schedule(0.0)
    # a + b pad 100 tokens; adding c would pad 1000 + 100 more
    assert [it.request_id for p in plan.prefills for it in p.items] == ["a", "b"]
    assert sched.execution is VLLM_ENGINE and VLLM_ENGINE.padded_prefill


def test_vllm_runs_up_to_1024_sequences():
    assert vllm_scheduler(ClusterSpec(1, 840_000, 8)).config.max_running == 1024


def test_lightllm_settings_follow_the_artifact():
    assert [chunk_size_for(d) for d in ("sharegpt", "l-eval", "lv-eval", "mixed")] == [256, 2048, 16384, 2048]
    assert [running_max_for(d) for d in ("sharegpt", "l-eval", "lv-eval", "mixed")] == [1024, 256, 256, 1024]
    assert chunk_size_for("zipf-1.2") == 512


def test_pd_disagg_decode_batch_is_capped():
    sched = PDDisaggScheduler(ClusterSpec(2, 100_000, 4), decode_max_batch=2)
    for k in range(5):
        sched.add_request(_req(f"r{k}", 100), 0.0)
    plan = sched.schedule(0.0)
    (pre,) = plan.prefills
    assert len(pre.items) == 5
    sched.update(
        BatchResult(
            pre.batch_id, "prefill", pre.instances, tuple(SampledToken(f"r{k}", 3) for k in range(5))
        ),
        0.1,
    )
    plan = sched.schedule(0.1)
    assert len(plan.migrations) == 5  # all transferred (memory allows) ...
    (dec,) = plan.decodes
    assert [it.request_id for it in dec.items] == ["r0", "r1"]  # ... 2 decode, FCFS


def test_pd_disagg_prefill_batch_is_capped_in_requests():
    sched = PDDisaggScheduler(ClusterSpec(2, 100_000, 4), prefill_max_batch=3)
    for k in range(5):
        sched.add_request(_req(f"r{k}", 100), 0.0)
    (pre,) = sched.schedule(0.0).prefills
    assert len(pre.items) == 3


class _Pre:
    def __init__(self, stable, crossing):
        self._s, self._c = stable, crossing

    def max_throughput_stable(self):
        return self._s

    def max_throughput(self):
        return self._c


def test_prescan_start_rate_sits_just_below_the_short_window_stable_edge():
    assert prescan_start_rate(_Pre(10.0, 30.0), 1.0) == pytest.approx(9.0)
    assert prescan_start_rate(_Pre(None, 20.0), 1.0) == pytest.approx(18.0)
    assert prescan_start_rate(_Pre(None, None), 1.5) == 1.5
