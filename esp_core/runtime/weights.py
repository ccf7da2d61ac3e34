"""Load a local Hugging Face checkpoint directory: config.json + safetensors.

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json` + shards)
layouts are supported. Nothing from the model directory is ever executed: no
`trust_remote_code`, no pickle-based `.bin` files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esp_core.runtime.config import ModelArch, UnsupportedModelError
from esp_core.runtime.model import hf_weight_names

if TYPE_CHECKING:
    from esp_core.runtime.tensor_parallel import TPContext


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or holds tensors that do not fit the config."""


# Tensors some checkpoints carry that the math does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist (or is not a directory)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint dir")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e


def load_arch(model_dir: str | Path) -> ModelArch:
    """The architecture of a checkpoint dir (UnsupportedModelError if we cannot run it)."""
    cfg = read_hf_config(model_dir)
    try:
        return ModelArch.from_hf_config(cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{model_dir}: {e}") from None


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed (needs a 'weight_map'): {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        # shard names come from the checkpoint: confine them to its directory
        root = path.resolve()
        outside = [str(f) for f in files if not f.resolve().is_relative_to(root)]
        if outside:
            raise CheckpointError(f"{index.name} names shard files outside {str(path)!r}: {outside}")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shard files that are missing: {missing}")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return [path / n for n in others]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(
            f"{str(path)!r} only has pickle checkpoints (.bin/.pt): they can execute code and are "
            "not loaded; convert them to safetensors first"
        )
    raise CheckpointError(f"{str(path)!r} has no model.safetensors (nor an index of shards)")


def _read_part(f, name: str, sl) -> torch.Tensor:
    """A whole safetensors tensor, or only the TP slice sl = (dim, lo, hi) of it."""
    if sl is None:
        return f.get_tensor(name)
    part = f.get_slice(name)
    dim, lo, hi = sl
    return part[:, lo:hi] if dim == 1 else part[lo:hi]


def load_hf_checkpoint(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
    tp: TPContext | None = None,
) -> tuple[ModelArch, dict[str, torch.Tensor]]:
    """(arch, HF-named weights in `dtype` on `device`), all names and shapes checked.

    With `tp`, each tensor is this TP rank's shard, read alone from the file (safetensors
    slices map only those bytes); `arch` stays the full model's."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    path = Path(model_dir)
    arch = load_arch(path)
    expected = hf_weight_names(arch)
    slices = tp.slices(arch) if tp is not None else {}
    files = _shard_files(path)
    weights: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    for file in tqdm(
        files, desc=f"loading {path.name}", unit="shard", disable=not progress or len(files) < 2
    ):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    # Tied checkpoints sometimes also store lm_head; it must equal embeddings.
                    if name == "lm_head.weight" and arch.tie_word_embeddings:
                        continue
                    unexpected.append(name)
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    bad_shape.append(f"{name}: checkpoint {shape} vs config {expected[name]}")
                    continue
                t = _read_part(f, name, slices.get(name))
                weights[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(weights) - {n.split(":")[0] for n in bad_shape})
    problems = []
    if bad_shape:
        problems.append(f"shape mismatch: {bad_shape[:5]}")
    if missing:
        problems.append(
            f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)"
        )
    if unexpected:
        problems.append(
            f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)} in all)"
        )
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match its config.json ("
            f"{arch.architecture}): " + "; ".join(problems)
        )
    return arch, weights
