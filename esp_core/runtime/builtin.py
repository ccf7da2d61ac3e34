"""The built-in default model: a small random-weight byte-level Llama.

It lets the whole server run (and CI test it) with no download. The vocabulary is fixed
by the built-in byte tokenizer: ids 0..255 are raw bytes, 256 is BOS "<s>", 257 is EOS
"</s>". Weights are a deterministic function of a seed. The init scale is chosen so
that logits are peaked (greedy decoding is stable under summation-order changes, which
the ESP exactness tests need) while the output still depends on context (it does not
repeat one token forever).

    python -m esp_core.runtime.builtin --save DIR [--seed 0]

writes a real Hugging Face checkpoint (config.json + model.safetensors) that
`transformers.LlamaForCausalLM.from_pretrained(DIR)` loads.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from esp_core.runtime.config import ModelArch

if TYPE_CHECKING:  # torch is imported by the functions that make tensors: the app reads
    import torch  # builtin_arch() without it

BYTE_VOCAB = 256
BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258

# Init scales (std of N(0, std^2) entries). Embeddings are O(1) so the current token
# dominates the residual stream; projections are ~1/sqrt(fan_in) scaled so attention and
# the MLP still mix in context; the LM head is large so logits are peaked (std ~ 4).
_EMBED_STD = 1.0
_PROJ_GAIN = 0.6
_LM_HEAD_STD = 0.25


def builtin_arch() -> ModelArch:
    return ModelArch(
        architecture="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        rope_scaling=None,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        qkv_bias=False,
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
    )


def builtin_state_dict(seed: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named weights of the builtin model, identical for the same seed on any machine.

    Tensors are drawn in a fixed order (sorted names) from one CPU torch.Generator in
    fp32, then cast, so the result depends only on (seed, dtype).
    """
    import torch

    from esp_core.runtime.model import hf_weight_names

    dtype = torch.float32 if dtype is None else dtype
    arch = builtin_arch()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, shape in sorted(hf_weight_names(arch).items()):
        if name.endswith("norm.weight"):
            # Norm weights near 1, slightly perturbed so they are not a no-op in tests.
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = _EMBED_STD * torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = _LM_HEAD_STD * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1]
            t = (_PROJ_GAIN / math.sqrt(fan_in)) * torch.randn(shape, generator=gen)
        out[name] = t.to(dtype)
    return out


def save_builtin(directory: str | Path, seed: int = 0) -> Path:
    """Write the builtin model as an HF checkpoint dir (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    cfg = builtin_arch().to_hf_config()
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in builtin_state_dict(seed).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True, metavar="DIR", help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    path = save_builtin(args.save, args.seed)
    print(f"wrote builtin model (seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
