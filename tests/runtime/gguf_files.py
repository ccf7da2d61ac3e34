"""Tiny GGUF checkpoints written with the `gguf` package, as llama.cpp's converter lays them out.

The weights come from a tiny random transformers model; each file stores its matrices in
one quantisation. q/k projections of Llama files are row-permuted as llama.cpp does it.
The K-quants (Q4_K, Q6_K) have no quantiser in the `gguf` package: their blocks are drawn
at random with finite scales, so the file defines its own weights (both loaders must
dequantise them to the same numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VOCAB = 96
_BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}  # bytes of one 256-value block
_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q6_K": (208,)}  # where each block keeps its f16 scales


def _f16_bytes(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float16).view(np.uint8)


MERGES = ["h e", "l l"]


def byte_level_vocab() -> list[str]:
    """3 control tokens, newline and the bytes ' '..'y' in GPT-2's byte alphabet, 2 merges."""
    from esp_core.tokenizer.hf_tokenizer import _bytes_to_unicode

    spell = _bytes_to_unicode()
    chars = [spell[10]] + [spell[b] for b in range(32, 122)]
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, *(m.replace(" ", "") for m in MERGES)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of the loader's unpermute_rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(rows: int, cols: int, qname: str, rng: np.random.Generator) -> np.ndarray:
    nblocks = cols // 256
    raw = rng.integers(0, 256, size=(rows, nblocks, _BLOCK_BYTES[qname]), dtype=np.uint8)
    # super-block scales so weights are ~0.1: Q6_K w = d * int8 scale * (q - 32); Q4_K
    # w = d * sc * q - dmin * m with 6-bit sc, m and 4-bit q (dmin ~ 7.5 d centres them)
    d, dmin = (3e-5, None) if qname == "Q6_K" else (2e-4, 1.5e-3)
    raw[:, :, _SCALE_OFFSETS[qname][0] : _SCALE_OFFSETS[qname][0] + 2] = _f16_bytes(d)
    if dmin is not None:
        raw[:, :, 2:4] = _f16_bytes(dmin)
    return raw.reshape(rows, nblocks * _BLOCK_BYTES[qname])


def write_gguf(hf_model, path: Path, qname: str, arch: str = "llama", seed: int = 0) -> Path:
    """Write `hf_model` (a tiny transformers Llama/Qwen2/Qwen3) as a GGUF file, matrices in `qname`."""
    import gguf

    cfg = hf_model.config
    qtype = gguf.GGMLQuantizationType[qname]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = byte_level_vocab()
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, t in state.items():
        if hf in names:
            name = names[hf]
        else:
            layer, rest = hf.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{block[rest]}"
        a = t.detach().to(torch.float32).numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        if a.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(name, np.ascontiguousarray(a))
        elif qname in _BLOCK_BYTES:
            w.add_tensor(name, _random_k_blocks(a.shape[0], a.shape[1], qname, rng), raw_dtype=qtype)
        elif qname == "F32":
            w.add_tensor(name, np.ascontiguousarray(a))
        elif qname == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
