"""Every execution path of InstanceWorker reproduces the single-pass reference.

Batched == unbatched, chunked prefill == whole prefill, cached decode == full recompute,
re-prefill after preemption == uninterrupted decoding. Builtin model, fp32; logprobs
(greedy, top-5) carry the numbers compared, within ATOL.
"""

from __future__ import annotations

import pytest
import torch

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    ReleaseReason,
    SamplingParams,
    TokenRange,
)
from tests.support.runtime import (
    decode_plan,
    generate_tokens,
    prefill_item,
    prefill_plan,
    reference_logits,
    release_plan,
    run_one,
)

ATOL = 1e-4
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=5)
PROMPTS = {
    "a": [256, *b"Elastic sequence parallelism"],
    "b": [256, *b"hi"],
    "c": [256],
    "d": [256, *b"The quick brown fox jumps over the lazy dog. " * 2],
}


@pytest.fixture(scope="module")
def worker():
    return InstanceWorker(WorkerConfig(kv_slots=1024))


@pytest.fixture(autouse=True)
def pool_is_empty_after(worker):
    yield
    worker.pool.check_invariants()
    assert worker.kv_free_slots() == worker.kv_total_slots()


def _assert_same(x, y):
    """Same tokens and logprobs (within ATOL) for two lists of SampledToken."""
    assert [s.token_id for s in x] == [s.token_id for s in y]
    for s, t in zip(x, y):
        assert s.logprob == pytest.approx(t.logprob, abs=ATOL)
        assert [tl.token_id for tl in s.top_logprobs] == [tl.token_id for tl in t.top_logprobs]


def test_cached_decode_matches_full_recompute(worker):
    """Each decode step's logprobs == log_softmax of a full pass over the sequence."""
    prompt = PROMPTS["a"]
    out = generate_tokens(worker, {"a": prompt}, 8, GREEDY)["a"]
    seq = prompt + [s.token_id for s in out]
    ref = torch.log_softmax(reference_logits(worker.model, seq), dim=-1)  # [T, V]
    for i, s in enumerate(out):
        row = ref[len(prompt) - 1 + i]
        assert s.token_id == int(row.argmax())
        assert s.logprob == pytest.approx(float(row[s.token_id]), abs=ATOL)
        assert [t.token_id for t in s.top_logprobs] == row.topk(5).indices.tolist()


def test_batched_equals_unbatched(worker):
    together = generate_tokens(worker, PROMPTS, 6, GREEDY)
    for rid, prompt in PROMPTS.items():
        alone = generate_tokens(worker, {rid: prompt}, 6, GREEDY)[rid]
        _assert_same(together[rid], alone)


def test_chunked_prefill_equals_whole_prefill(worker):
    prompt = PROMPTS["d"]
    whole = generate_tokens(worker, {"d": prompt}, 4, GREEDY)["d"]
    new = NewRequest("d", tuple(prompt), GREEDY)
    # Chunk 2 shares its batch with a whole prefill of another request (no cached KV).
    run_one(worker, prefill_plan([prefill_item("d", 0, 17, sample=False)], [new]))
    res = run_one(
        worker,
        prefill_plan(
            [prefill_item("d", 17, 60, sample=False), prefill_item("b", 0, len(PROMPTS["b"]))],
            [NewRequest("b", tuple(PROMPTS["b"]), GREEDY)],
        ),
    )
    assert [s.request_id for s in res.sampled] == ["b"]
    first = run_one(worker, prefill_plan([prefill_item("d", 60, len(prompt))])).sampled[0]
    chunked = [first]
    for step in range(3):
        res = run_one(worker, decode_plan({"d": (chunked[-1].token_id, len(prompt) + step)}))
        chunked.append(res.sampled[0])
    _assert_same(chunked, whole)
    worker.execute(release_plan(["d", "b"]))


def test_reprefill_after_preemption_continues_identically(worker):
    prompt = PROMPTS["a"]
    straight = generate_tokens(worker, {"a": prompt}, 10, GREEDY)["a"]
    ids = [s.token_id for s in straight]
    first_part = generate_tokens(worker, {"a": prompt}, 6, GREEDY, release=False)["a"]
    worker.execute(release_plan(["a"], ReleaseReason.PREEMPTED))
    assert worker.pool.num_tokens_of("a") == 0
    # Re-prefill prompt + outputs 0..4 (output 5 was sampled but never fed back).
    p = len(prompt)
    item = prefill_item("a", 0, p + 5, extra_token_ids=ids[:5])
    again = [run_one(worker, prefill_plan([item])).sampled[0]]
    for step in range(4):
        res = run_one(worker, decode_plan({"a": (again[-1].token_id, p + 5 + step)}))
        again.append(res.sampled[0])
    _assert_same(first_part + again[1:], straight)
    _assert_same(again[:1], straight[5:6])
    worker.execute(release_plan(["a"]))
    assert "a" not in worker.states


def test_reprefill_on_a_fresh_worker_uses_extra_token_ids():
    """An instance that never saw the outputs learns them from extra_token_ids."""
    w1 = InstanceWorker(WorkerConfig(kv_slots=256))
    w2 = InstanceWorker(WorkerConfig(kv_slots=256))
    prompt = PROMPTS["b"]
    ids = [s.token_id for s in generate_tokens(w1, {"b": prompt}, 5, GREEDY)["b"]]
    new = NewRequest("b", tuple(prompt), GREEDY)
    res = run_one(w2, prefill_plan([prefill_item("b", 0, len(prompt) + 4, extra_token_ids=ids[:4])], [new]))
    assert res.sampled[0].token_id == ids[4]
    assert w2.states["b"].output_ids == ids[:4]


def test_keep_stores_only_this_instances_positions(worker):
    prompt = PROMPTS["d"]
    rng = TokenRange(0, len(prompt))
    item = PrefillItem(
        "d",
        rng,
        0,
        keep=(
            KVKeep(0, (TokenRange(5, 20), TokenRange(40, 50))),
            KVKeep(1, (TokenRange(0, 5), TokenRange(20, 40), TokenRange(50, len(prompt)))),
        ),
    )
    plan = IterationPlan(
        1, new_requests=(NewRequest("d", tuple(prompt), GREEDY),), prefills=(PrefillBatch(7, (0,), (item,)),)
    )
    res = run_one(worker, plan)
    assert sorted(worker.pool.positions_of("d")) == [*range(5, 20), *range(40, 50)]
    # Keeping only part of the KV does not change this batch's own output.
    whole = generate_tokens(worker, {"x": prompt}, 1, GREEDY)["x"]
    assert res.sampled[0].token_id == whole[0].token_id
    worker.execute(release_plan(["d"]))


def test_multi_instance_batches_need_esp(worker):
    # Multi-instance batches run on the ESP executor (InstanceWorker._run_esp, tested in
    # tests/esp); without a torch.distributed group the batch fails with a clear error.
    item = prefill_item("m", 0, 3)
    plan = IterationPlan(
        1, new_requests=(NewRequest("m", (256, 1, 2), GREEDY),), prefills=(PrefillBatch(1, (0, 1), (item,)),)
    )
    (res,) = worker.execute(plan)
    assert res.error and "torch.distributed" in res.error
    assert worker.pool.num_tokens_of("m") == 0
    worker.execute(release_plan(["m"]))


def test_batch_on_other_instances_is_skipped(worker):
    plan = IterationPlan(
        1,
        new_requests=(NewRequest("o", (256, 1), GREEDY),),
        prefills=(PrefillBatch(1, (3,), (prefill_item("o", 0, 2, instance=3),)),),
    )
    assert worker.execute(plan) == []
    assert worker.pool.num_tokens_of("o") == 0
    worker.execute(release_plan(["o"], instance=0))


def test_failed_batches_report_errors_and_leak_nothing(worker):
    # Unknown request.
    bad = IterationPlan(1, decodes=(DecodeBatch(2, (0,), (DecodeItem("ghost", 5, 3, 0, (0,), 0),)),))
    (res,) = worker.execute(bad)
    assert res.error and "ghost" in res.error and res.sampled == ()
    # Pool too small for the prompt: error, and the other item's slots are not leaked.
    small = InstanceWorker(WorkerConfig(kv_slots=8))
    plan = prefill_plan(
        [prefill_item("s1", 0, 4), prefill_item("s2", 0, 6)],
        [NewRequest("s1", (256, 1, 2, 3), GREEDY), NewRequest("s2", (256, 1, 2, 3, 4, 5), GREEDY)],
    )
    (res,) = small.execute(plan)
    assert res.error and "KV pool full" in res.error
    assert small.kv_free_slots() == 8
    small.pool.check_invariants()


def test_full_context_is_accepted_and_beyond_is_rejected(worker):
    """Positions up to max_position_embeddings - 1 (131071 for builtin) run; ctx fails."""
    ctx = worker.arch.max_context_len
    assert ctx == worker.arch.max_position_embeddings == 131072
    prompt = tuple([256] + [65] * (ctx - 1))
    # The last 8 prompt tokens as a chunk (earlier KV absent: we test RoPE/positions).
    item = prefill_item("far", ctx - 8, ctx)
    res = run_one(worker, prefill_plan([item], [NewRequest("far", prompt, GREEDY)]))
    assert res.sampled[0].logprob > -50
    decode = DecodeItem("far", res.sampled[0].token_id, ctx, 0, (0,), 0)
    (res,) = worker.execute(IterationPlan(2, decodes=(DecodeBatch(3, (0,), (decode,)),)))
    assert res.error and "outside the model's context" in res.error
    assert worker.pool.num_tokens_of("far") == 8  # the failed step's slot was given back
    worker.execute(release_plan(["far"]))


def test_decode_item_output_prefix_fills_history(worker):
    """A worker that missed earlier steps learns them from output_prefix (penalties)."""
    prompt = PROMPTS["b"]
    w = InstanceWorker(WorkerConfig(kv_slots=64))
    p = len(prompt)
    run_one(w, prefill_plan([prefill_item("b", 0, p)], [NewRequest("b", tuple(prompt), GREEDY)]))
    # Steps at positions p, p+1 happened elsewhere; this worker stores their KV by
    # re-prefilling nothing -- here we only check the history bookkeeping.
    item = DecodeItem("b", 7, p + 2, 0, (0,), 0, output_prefix=(3, 4))
    run_one(w, IterationPlan(2, decodes=(DecodeBatch(3, (0,), (item,)),)))
    assert w.states["b"].output_ids == [3, 4, 7]


def test_sample_inside_the_prompt_is_refused_without_leaking(worker):
    prompt = PROMPTS["a"]
    plan = prefill_plan([prefill_item("z", 0, 5, sample=True)], [NewRequest("z", tuple(prompt), GREEDY)])
    (res,) = worker.execute(plan)
    assert res.error and "inside the prompt" in res.error
    assert worker.pool.num_tokens_of("z") == 0
    worker.execute(release_plan(["z"]))


def test_local_scheduler_resume_after_a_lost_group_equals_an_undisturbed_run():
    """A request streams 3 tokens, its instance is lost; a fresh worker and scheduler
    resume it from prompt + those tokens: the rest equals the undisturbed run (greedy and
    seeded sampling alike, since sampling is keyed on (seed, output index))."""
    from esp_core.sched.interface import ClusterSpec
    from esp_core.sched.local import LocalScheduler

    def drive(sched, worker):
        out: list[int] = []
        while sched.has_unfinished():
            for result in worker.execute(sched.schedule(0.0)):
                out += [ev.token.token_id for ev in sched.update(result, 0.0) if ev.token]
        return out

    prompt = tuple(range(3, 40))
    for sampling in (
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True),
    ):
        cluster = ClusterSpec(1, 256)
        sched = LocalScheduler(cluster)
        sched.add_request(NewRequest("a", prompt, sampling), 0.0)
        whole = drive(sched, InstanceWorker(WorkerConfig(kv_slots=256)))
        first = whole[:3]
        resumed = LocalScheduler(cluster)
        resumed.add_resumed_request(NewRequest("a", prompt, sampling), first, 0.0)
        worker = InstanceWorker(WorkerConfig(kv_slots=256))
        assert first + drive(resumed, worker) == whole
        assert worker.kv_free_slots() == 256 and not worker.states
