"""A tiny random Llama checkpoint with a short context, and its transformers twin with a
RoPE scaling override: the reference for `model.rope_scaling`.

    served_dir, reference = scaled_pair(tmp_path, SCALINGS["yarn"])

`served_dir` holds the checkpoint as trained (plain RoPE, `ORIGINAL_CONTEXT` positions);
`reference` is transformers' LlamaForCausalLM with the same weights and `rope_scaling`
set in its config, what vLLM's `hf_overrides={"rope_scaling": ...}` would build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ORIGINAL_CONTEXT = 64  # tiny, so positions beyond it are cheap
VOCAB = 96
INIT_STD = 0.3  # peaked logits: greedy choices rarely sit within float noise of a tie
ROPE_THETA = 10000.0

SCALINGS: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT},
}


def _config(rope_scaling: dict[str, Any] | None):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": ROPE_THETA, **(rope_scaling or {})}
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ORIGINAL_CONTEXT,
        rope_parameters=rope,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
    )


def scaled_pair(directory: Path, rope_scaling: dict[str, Any], seed: int = 0):
    """(checkpoint dir without scaling, transformers model with `rope_scaling`), same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    plain = LlamaForCausalLM(_config(None)).eval()
    plain.save_pretrained(directory)
    reference = LlamaForCausalLM(_config(rope_scaling)).eval()
    reference.load_state_dict(plain.state_dict())
    return Path(directory), reference
