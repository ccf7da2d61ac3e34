"""The runtime against Hugging Face transformers (fp32) on tiny random checkpoints.

Tolerances: logits within LOGIT_ATOL of HF (logits have std ~1.5-3); greedy tokens must
be identical at every step whose HF top-2 margin exceeds MARGIN (once a step is closer
than that, the sequences may legitimately diverge and comparison stops).
"""

from __future__ import annotations

import random

import pytest
import torch

from esp_core.runtime.config import ModelArch, WorkerConfig
from esp_core.runtime.model import CausalLM
from esp_core.runtime.weights import load_hf_checkpoint
from esp_core.runtime.worker import InstanceWorker
from tests.runtime.hf_models import (
    SPECS,
    VOCAB,
    build_hf_model,
    hf_greedy,
    hf_logits,
    rewrite_config_legacy,
    save_hf_model,
)
from tests.support.runtime import generate, reference_logits

LOGIT_ATOL = 2e-4
# HF computes RoPE angles in fp32 (position * inv_freq), we in float64: near position
# 1000 its angles are off by ~1e-4 rad, which moves logits by up to ~3e-4.
LOGIT_ATOL_LONG = 1e-3
MARGIN = 2e-3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, checkpoint dir) for every spec, built once per module."""
    out = {}
    for name in SPECS:
        model = build_hf_model(name)
        out[name] = (model, save_hf_model(model, tmp_path_factory.mktemp(name)))
    return out


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _ours(path) -> CausalLM:
    arch, weights = load_hf_checkpoint(path, progress=False)
    return CausalLM(arch, weights, torch.float32, "cpu")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_prompt_logits_match_hf(name, checkpoints):
    hf, path = checkpoints[name]
    ours = _ours(path)
    prompt = _prompt(40, seed=1)
    if ours.arch.rope_type == "dynamic":
        # Our dynamic NTK is frozen at max_position_embeddings * factor (see rope.py);
        # HF uses the same base when the pass's last position is that length - 1.
        end = ours.arch.max_context_len
        assert end == int(ours.arch.max_position_embeddings * ours.arch.rope_params["factor"])
        positions = list(range(end - len(prompt), end))
    else:
        positions = list(range(len(prompt)))
    ref = hf_logits(hf, prompt, positions)
    got = reference_logits(ours, prompt, positions)
    torch.testing.assert_close(got, ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "llama_linear", "llama_yarn"])
def test_logits_match_hf_at_the_end_of_the_context(name, checkpoints):
    """Scaled RoPE matters most at long positions: run the prompt at the context's end."""
    hf, path = checkpoints[name]
    ours = _ours(path)
    prompt = _prompt(24, seed=2)
    end = ours.arch.max_position_embeddings
    positions = list(range(end - len(prompt), end))
    torch.testing.assert_close(
        reference_logits(ours, prompt, positions),
        hf_logits(hf, prompt, positions),
        atol=LOGIT_ATOL_LONG,
        rtol=0,
    )


@pytest.mark.parametrize("name", sorted(n for n in SPECS if n != "llama_dynamic"))
def test_greedy_generation_matches_hf(name, checkpoints):
    """Batched prefill + batched decode through InstanceWorker vs HF's greedy loop."""
    hf, path = checkpoints[name]
    worker = InstanceWorker(WorkerConfig(model=str(path), kv_slots=256))
    prompts = {"a": _prompt(20, seed=3), "b": _prompt(33, seed=4), "c": _prompt(1, seed=5)}
    steps = 10
    ours = generate(worker, prompts, steps)
    for rid, prompt in prompts.items():
        ref, margins = hf_greedy(hf, prompt, steps)
        compared = 0
        for mine, theirs, margin in zip(ours[rid], ref, margins):
            if margin <= MARGIN:
                break
            assert mine == theirs, f"{name}/{rid}: step {compared}: {ours[rid]} vs HF {ref}"
            compared += 1
        assert compared >= 3, f"{name}/{rid}: too few confident steps ({margins})"
    assert worker.kv_free_slots() == 256


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "qwen3_qk_norm_gqa"])
def test_legacy_config_layout_parses_the_same(tmp_path, checkpoints, name):
    """transformers 4.x config.json (rope_theta + rope_scaling) gives the same arch and logits."""
    hf, path = checkpoints[name]
    assert "rope_parameters" in (path / "config.json").read_text()  # saved by transformers 5
    legacy = save_hf_model(hf, tmp_path / "legacy")
    rewrite_config_legacy(legacy)
    assert "rope_parameters" not in (legacy / "config.json").read_text()
    a, b = _ours(path), _ours(legacy)
    assert a.arch == b.arch
    assert a.arch.rope_theta == hf.config.rope_parameters["rope_theta"]
    prompt = _prompt(40, 5)
    assert torch.allclose(reference_logits(b, prompt), hf_logits(hf, prompt), atol=LOGIT_ATOL, rtol=0)


def test_sharded_checkpoint_loads_identically(tmp_path, checkpoints):
    hf, path = checkpoints["llama_mha"]
    sharded = save_hf_model(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    _, w1 = load_hf_checkpoint(path, progress=False)
    _, w2 = load_hf_checkpoint(sharded, progress=False)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


@pytest.mark.parametrize("name", sorted(SPECS))
def test_arch_counts_match_hf(name, checkpoints):
    hf, path = checkpoints[name]
    arch = ModelArch.from_hf_config(hf.config.to_dict())
    assert arch.num_params == hf.num_parameters()
    assert arch.kv_bytes_per_token(2) == (arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 2)
