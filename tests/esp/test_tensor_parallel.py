"""Tensor parallelism inside an instance == one unsharded instance == transformers.

The 4-rank gloo group is laid out as 2 instances x TP 2 (world rank = instance * 2 +
tp_rank). Tiny random Llamas, fp32, peaked logits: GQA with as many KV heads as TP ranks
(one each) and with fewer (one KV head, replicated on both ranks). Runs are teacher-forced
with the unsharded reference's tokens, so every sampled position compares the whole
log-softmax vector within TOL; greedy tokens must also equal transformers' own greedy
continuation. Prompts of 7 to 6,000 tokens; single-instance (TP 2 x 1) and ring prefill +
distributed decode across both instances (TP 2 x 2, ESP per TP rank).
"""

from __future__ import annotations

import pytest
import torch

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import IterationPlan
from tests.esp.test_esp_execution import Run, make_prompts, params
from tests.support.esp import even_keep, next_id, prefill_batch, prefill_item, save_tiny_model
from tests.support.runtime import generate_tokens
from tests.support.tp import TPCluster

pytestmark = pytest.mark.slow

TP = 2
KV_SLOTS = 8192
BF16_TOL = 0.25  # |logprob| difference; bf16 keeps 8 bits of mantissa
MODELS = {"gqa": dict(num_heads=4, num_kv_heads=2), "kv1": dict(num_heads=4, num_kv_heads=1)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_models")
    return {name: str(save_tiny_model(root / name, seed=5, **kw)) for name, kw in MODELS.items()}


@pytest.fixture(params=sorted(MODELS))
def env(request, dist_group, model_dirs):
    """(TP cluster, unsharded reference worker, model dir); pools must be empty after."""
    model = model_dirs[request.param]
    cluster = TPCluster(dist_group, model, KV_SLOTS, TP)
    ref = InstanceWorker(WorkerConfig(model=model, kv_slots=2 * KV_SLOTS, num_threads=1))
    yield cluster, ref, model
    try:
        for free, total, holding, states in cluster.pool_states():
            assert free == total and not holding and not states, (free, total, holding, states)
    finally:
        cluster.reset()


def transformers_greedy(model_dir: str, prompts: dict[str, list[int]], ref_out) -> dict[str, list[int]]:
    """transformers' greedy token after the prompt and after each reference output (one
    teacher-forced pass per request)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for rid, prompt in prompts.items():
            seq = list(prompt) + [t.token_id for t in ref_out[rid][:-1]]
            logits = hf(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
            out[rid] = logits[len(prompt) - 1 :].argmax(-1).tolist()
    return out


def check_reference_is_transformers(model_dir, prompts, ref_out):
    hf = transformers_greedy(model_dir, prompts, ref_out)
    for rid, toks in ref_out.items():
        assert [t.token_id for t in toks] == hf[rid], rid


def test_shards_and_pool_are_per_rank(env):
    """Each rank holds its slices only (columns of QKV/gate-up, rows of O/down, its vocab
    rows) and a KV pool of its KV heads."""
    cluster, ref, _ = env
    a, lw = ref.arch, ref.model.layers[0]
    kv_local = max(1, a.num_kv_heads // TP)
    for shapes in cluster.local_shapes():
        assert shapes["w_qkv"] == ((a.num_heads // TP + 2 * kv_local) * a.head_dim, a.hidden_size)
        assert shapes["w_o"] == (a.hidden_size, a.num_heads // TP * a.head_dim)
        assert shapes["w_gate_up"] == (lw.w_gate_up.shape[0] // TP, a.hidden_size)
        assert shapes["w_down"] == (a.hidden_size, lw.w_down.shape[1] // TP)
        assert shapes["embed"] == (a.vocab_size // TP, a.hidden_size)
        assert shapes["kv_pool"][2:] == (2, kv_local, a.head_dim)


def test_tp2_single_instance(env):
    """TP 2 x 1 instance: whole-prompt prefill then decode on instance 0 (ranks 0, 1)."""
    cluster, ref_worker, model = env
    prompts = make_prompts([7, 300, 2000], seed=1)
    n_out = 4
    ref = generate_tokens(ref_worker, prompts, n_out, sampling=params(n_out))
    check_reference_is_transformers(model, prompts, ref)
    run = Run(cluster, ref, prompts)
    items = [prefill_item(rid, 0, len(p), 0, even_keep(0, len(p), (0,))) for rid, p in prompts.items()]
    run.prefill((0,), items, new=run.new_requests(prompts, n_out))
    for step in range(n_out - 1):
        run.decode({rid: step for rid in prompts}, {rid: (0, 0) for rid in prompts})
    assert run.compared == len(prompts) * n_out
    run.release(list(prompts), instances=(0, 1))


def test_tp2_two_instances_esp(env):
    """TP 2 x 2 instances: striped ring prefill over both, KV split between them, decode
    with masters and new-KV holders alternating (ESP exchanges per TP rank)."""
    cluster, ref_worker, model = env
    prompts = make_prompts([7, 61, 6000], seed=2)
    n_out = 4
    ref = generate_tokens(ref_worker, prompts, n_out, sampling=params(n_out))
    check_reference_is_transformers(model, prompts, ref)
    run = Run(cluster, ref, prompts)
    ring = (1, 0)
    items = [
        prefill_item(rid, 0, len(p), offset=i % 2, keep=even_keep(0, len(p), ring))
        for i, (rid, p) in enumerate(prompts.items())
    ]
    run.prefill(ring, items, new=run.new_requests(prompts, n_out))
    for step in range(n_out - 1):
        spec = {rid: ((i + step) % 2, (i + step + 1) % 2) for i, rid in enumerate(prompts)}
        run.decode({rid: step for rid in prompts}, spec, instances=(0, 1))
    assert run.compared == len(prompts) * n_out
    run.release(list(prompts), instances=(0, 1))


def test_tp2_bf16_tracks_unsharded_bf16(dist_group, model_dirs):
    """bf16 end to end (partials summed in fp32): TP 2 x 2 stays within bf16 noise of an
    unsharded bf16 instance, and picks the same token wherever the choice is clear."""
    model = model_dirs["gqa"]
    cluster = TPCluster(dist_group, model, 2048, TP, dtype="bfloat16")
    ref_worker = InstanceWorker(WorkerConfig(model=model, kv_slots=4096, dtype="bfloat16", num_threads=1))
    prompts = make_prompts([7, 200, 900], seed=6)
    ref = generate_tokens(ref_worker, prompts, 1, sampling=params(1))
    run = Run(cluster, ref, prompts)
    items = [
        prefill_item(rid, 0, len(p), offset=i % 2, keep=even_keep(0, len(p), (0, 1)))
        for i, (rid, p) in enumerate(prompts.items())
    ]
    plan = IterationPlan(
        next_id(), new_requests=run.new_requests(prompts, 1), prefills=(prefill_batch((0, 1), items),)
    )
    sampled = cluster.execute(plan)
    for rid in prompts:
        got = {t.token_id: t.logprob for t in sampled[rid].top_logprobs}
        want = {t.token_id: t.logprob for t in ref[rid][0].top_logprobs}
        err = max(abs(got[t] - want[t]) for t in want)
        assert err < BF16_TOL, (rid, err)
        top = sorted(want.values(), reverse=True)
        if top[0] - top[1] > 2 * BF16_TOL:
            assert sampled[rid].token_id == ref[rid][0].token_id, rid
    cluster.reset()
