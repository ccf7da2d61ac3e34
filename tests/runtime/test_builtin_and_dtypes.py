"""The builtin model (determinism, vocabulary, HF compatibility, usable logits) and the
reduced-precision dtypes."""

from __future__ import annotations

import pytest
import torch

from esp_core.runtime.builtin import BOS_ID, EOS_ID, builtin_arch, builtin_state_dict, main
from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker, load_model
from tests.support.runtime import generate, reference_logits

PROMPT = [BOS_ID, *b"The quick brown fox jumps over the lazy dog"]


def test_builtin_arch_matches_the_brief():
    a = builtin_arch()
    assert (
        a.vocab_size,
        a.hidden_size,
        a.num_layers,
        a.num_heads,
        a.num_kv_heads,
        a.head_dim,
        a.intermediate_size,
    ) == (258, 256, 4, 8, 2, 32, 768)
    assert (a.bos_token_id, a.eos_token_ids) == (256, (257,)) and (BOS_ID, EOS_ID) == (256, 257)
    assert a.max_position_embeddings == 131072 and not a.tie_word_embeddings
    assert a.rope_theta == 1e6


def test_weights_are_a_deterministic_function_of_the_seed():
    a, b, c = builtin_state_dict(0), builtin_state_dict(0), builtin_state_dict(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    half = builtin_state_dict(0, torch.bfloat16)
    assert half["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(half["lm_head.weight"], a["lm_head.weight"].to(torch.bfloat16))


def test_saved_builtin_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    assert main(["--save", str(tmp_path / "b"), "--seed", "0"]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT]), use_cache=False).logits[0]
    ours = reference_logits(load_model(WorkerConfig()), PROMPT)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_logits_are_peaked_and_outputs_depend_on_context():
    logits = reference_logits(load_model(WorkerConfig()), PROMPT)
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    assert float(margins.median()) > 0.3  # greedy is robust to summation order
    assert float(torch.softmax(logits, -1).max(-1).values.median()) > 0.2  # not flat
    worker = InstanceWorker(WorkerConfig(kv_slots=512))
    outs = generate(worker, {"a": PROMPT, "b": [BOS_ID, *b"abc"]}, 40)
    assert len(set(outs["a"])) >= 5 and len(set(outs["b"])) >= 5
    assert outs["a"][:10] != outs["b"][:10]


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 0.3), ("float16", 0.05)])
def test_half_precision_tracks_fp32(dtype, atol):
    ref = reference_logits(load_model(WorkerConfig()), PROMPT)
    model = load_model(WorkerConfig(dtype=dtype))
    assert model.embed_tokens.dtype == getattr(torch, dtype)
    got = reference_logits(model, PROMPT)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    margins = ref.topk(2, -1).values
    confident = (margins[:, 0] - margins[:, 1]) > 2 * atol
    assert torch.equal(got.argmax(-1)[confident], ref.argmax(-1)[confident])
    worker = InstanceWorker(WorkerConfig(dtype=dtype, kv_slots=128))
    assert worker.pool.kv.dtype == getattr(torch, dtype)
    assert len(generate(worker, {"a": PROMPT}, 4)["a"]) == 4
