"""Load a GGUF checkpoint (one `.gguf` file, as llama.cpp writes it) into HF-named weights.

The architecture and its hyper-parameters come from the file's metadata
(`{arch}.block_count`, `{arch}.attention.head_count`, ...); tensors are dequantised with
the `gguf` package's own code to the serving dtype at load, so the runtime computes with
plain dense weights. llama.cpp stores Llama's q/k projections with the rows of each head
interleaved for its RoPE layout; they are permuted back (what transformers does), Qwen
files are stored as is.

`read_gguf_arch` is torch-free (the app checks a config's memory budget with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esp_core.runtime.config import ModelArch, UnsupportedModelError

# GGUF architectures -> ours (llama.cpp writes Mistral checkpoints as "llama")
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFError(ValueError):
    """The file is not a GGUF checkpoint this runtime can load (the message says why)."""


def _reader(path: str | Path) -> Any:
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"GGUF file {str(p)!r} does not exist")
    try:
        return GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError/struct errors on bad files
        raise GGUFError(f"{str(p)!r} is not a readable GGUF file ({exc})") from exc


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata (arrays of tokens/merges are left to the tokenizer)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in ("tokens", "scores", "token_type"):
            continue
        if key == "tokenizer.ggml.merges":
            continue
        try:
            out[key] = field.contents()
        except Exception:  # an exotic field type: not one we read
            continue
    return out


def arch_from_metadata(meta: dict[str, Any], tensor_names: set[str], num_tokens: int | None) -> ModelArch:
    gguf_arch = meta.get("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {gguf_arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{gguf_arch}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {gguf_arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get(f"{gguf_arch}.attention.key_length") or hidden // heads)
    rope_dims = meta.get(f"{gguf_arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UnsupportedModelError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError("GGUF rope_freqs (llama3-style RoPE scaling) is not supported")
    scaling_type = meta.get(f"{gguf_arch}.rope.scaling.type")
    rope_scaling = None
    if scaling_type not in (None, "none"):
        factor = float(get("rope.scaling.factor"))
        items: dict[str, Any] = {"rope_type": scaling_type, "factor": factor}
        if scaling_type == "yarn":
            items["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        rope_scaling = tuple(sorted(items.items()))
    vocab = meta.get(f"{gguf_arch}.vocab_size") or num_tokens
    if vocab is None:
        raise UnsupportedModelError("GGUF metadata states no vocabulary size (nor a token list)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelArch(
        architecture=GGUF_ARCHITECTURES[gguf_arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{gguf_arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{gguf_arch}.rope.freq_base") or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        o_proj_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
    )


def read_gguf_arch(path: str | Path) -> ModelArch:
    """The architecture a GGUF file describes (torch-free; UnsupportedModelError if not ours)."""
    reader = _reader(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    try:
        return arch_from_metadata(
            gguf_metadata(reader),
            {t.name for t in reader.tensors},
            None if tokens is None else len(tokens.data),
        )
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, [pairs, 2] interleaved -> [2, pairs] halves.

    w [n_head * head_dim, ...] -> the same shape, rows in the HF (rotate-half) order.
    """
    pairs = w.shape[0] // n_head // 2
    return w.reshape(n_head, pairs, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """One reader tensor -> float32 array in row-major [out, in] (GGUF lists dims reversed)."""
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    if qtype.name not in SUPPORTED_QUANTS:
        raise GGUFError(
            f"tensor {tensor.name} is quantised as {qtype.name}, which is not supported; "
            f"supported: {', '.join(SUPPORTED_QUANTS)} (re-quantise the file, e.g. to Q8_0 or Q4_K)"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(dequantize(tensor.data, qtype), dtype=np.float32).reshape(shape)


def load_gguf_checkpoint(path: str | Path, dtype: Any = None, device: Any = "cpu"):
    """(arch, HF-named weights in `dtype` on `device`) from a GGUF file, names and shapes checked."""
    import torch

    from esp_core.runtime.model import hf_weight_names
    from esp_core.runtime.weights import CheckpointError

    dtype = torch.float32 if dtype is None else dtype
    reader = _reader(path)
    arch = read_gguf_arch(path)
    expected = hf_weight_names(arch)
    weights: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None or name not in expected:
            unexpected.append(tensor.name)
            continue
        w = dequantize_tensor(tensor)
        if arch.architecture == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_rows(w, arch.num_heads)
        elif arch.architecture == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_rows(w, arch.num_kv_heads)
        if tuple(w.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: {tensor.name} has shape {w.shape}, metadata says {expected[name]}"
            )
        weights[name] = torch.from_numpy(np.array(w, copy=True)).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(weights))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the metadata ({arch.architecture}): "
            f"missing {missing[:5]} ({len(missing)}), not understood {unexpected[:5]} ({len(unexpected)})"
        )
    return arch, weights
