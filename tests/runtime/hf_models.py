"""Tiny random Hugging Face checkpoints built with transformers itself (the reference).

Weights use a large init std so logits are peaked (architecture.md §6): greedy choices then rarely
sit within float noise of a tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

INIT_STD = 0.3
VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    initializer_range=INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (model class name, config kwargs)
SPECS: dict[str, tuple[str, dict]] = {
    "llama_mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)),
    "llama_gqa_llama3": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_linear": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        ),
    ),
    "llama_dynamic": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "llama_yarn": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_tied_bias": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            attention_bias=True,
        ),
    ),
    "qwen2_bias_tied_mqa": (
        "qwen2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen3_qk_norm_gqa": (
        "qwen3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "mistral_head_dim": (
        "mistral",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            sliding_window=None,
        ),
    ),
}


def build_hf_model(name: str, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    kind, kwargs = SPECS[name]
    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**_COMMON, **kwargs)).eval()
    if kind == "qwen2" or kwargs.get("attention_bias"):
        # HF inits biases to zero; random biases make the test actually check them.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0.0, INIT_STD)
    if kind == "qwen3":
        # HF inits the q/k norms to ones; perturbed, the test checks they are applied.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("q_norm.weight", "k_norm.weight")):
                    p.add_(torch.randn_like(p) * 0.2)
    return model


def save_hf_model(model, directory: Path, max_shard_size: str | None = None) -> Path:
    kwargs = (
        {"safe_serialization": True}
        if max_shard_size is None
        else {"safe_serialization": True, "max_shard_size": max_shard_size}
    )
    try:
        model.save_pretrained(directory, **kwargs)
    except TypeError:  # transformers 5 dropped safe_serialization (always safetensors)
        kwargs.pop("safe_serialization")
        model.save_pretrained(directory, **kwargs)
    return directory


def rewrite_config_legacy(directory: Path) -> None:
    """Rewrite config.json in the transformers 4.x layout (rope_theta + rope_scaling)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    path.write_text(json.dumps(cfg))


@torch.no_grad()
def hf_logits(model, token_ids: list[int], position_ids: list[int] | None = None) -> torch.Tensor:
    """[T, V] fp32 logits of a full forward pass (no cache)."""
    ids = torch.tensor([token_ids])
    kwargs = {} if position_ids is None else {"position_ids": torch.tensor([position_ids])}
    return model(input_ids=ids, use_cache=False, **kwargs).logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation recomputing the whole sequence each step (no KV cache):
    (tokens, top-2 margin of each step)."""
    seq = list(prompt)
    tokens, margins = [], []
    for _ in range(steps):
        logits = hf_logits(model, seq)[-1]
        top2 = torch.topk(logits, 2).values
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        margins.append(float(top2[0] - top2[1]))
        seq.append(tok)
    return tokens, margins
