"""Frozen configuration of the runtime: the model architecture and one worker's settings.

Torch-free on purpose, so `app/` can validate a config tree without importing torch.

`ModelArch` is parsed from a Hugging Face `config.json` dict (both the transformers 4.x
layout -- `rope_theta` + `rope_scaling` -- and the 5.x layout -- `rope_parameters`).
Only what this runtime computes exactly is accepted; anything else raises
`UnsupportedModelError` naming the field, the value, and what is supported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash")

# HF `architectures` entries we map onto our decoder flavours.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# rope_parameters keys that do not change the math (they are copies of other fields).
_ROPE_IGNORED_KEYS = {"rope_type", "type", "rope_theta"}
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a config field is outside what the runtime supports."""


@dataclass(frozen=True)
class ModelArch:
    """Everything the decoder needs to know about a Llama-family model.

    `rope_scaling` is the scaling dict in hashable form: a sorted tuple of (key, value)
    items with `rope_type` among them, or None for plain RoPE. `sliding_window` is always
    None for accepted models: sliding-window attention is refused (architecture.md §3.2) unless the
    window covers the whole context, in which case it is a no-op and dropped.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    o_proj_bias: bool = False  # Llama `attention_bias=True` also biases o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm of each head's q and k before RoPE

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) < 1:
                raise UnsupportedModelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for GQA/MQA"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None:
            raise UnsupportedModelError(
                f"sliding-window attention (window {self.sliding_window}) is not supported: "
                "ESP keeps a request's KV as an unordered set of tokens (architecture.md §3.2); use a "
                "full-attention model or a config whose window covers max_position_embeddings"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    # ---------------------------------------------------------------- derived values
    @property
    def rope_type(self) -> str:
        return str(self.rope_params.get("rope_type", "default"))

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling) if self.rope_scaling else {}

    @property
    def max_context_len(self) -> int:
        """Longest sequence (prompt + output) the model serves: positions 0..len-1.

        vLLM's rule: linear, dynamic and yarn scaling extend the context by `factor`
        (yarn from `original_max_position_embeddings`); llama3 checkpoints already state
        the extended length in `max_position_embeddings`.
        """
        p, kind = self.rope_params, self.rope_type
        if kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * float(p["factor"]))
        if kind == "yarn" and p.get("factor") is not None:
            return int(int(p["original_max_position_embeddings"]) * float(p["factor"]))
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V of one token over all layers (the KV pool's cost per slot)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    def with_rope_scaling(self, override: Mapping[str, Any] | None) -> ModelArch:
        """This architecture with its RoPE scaling replaced by `override` (None: unchanged).

        `override` is a Hugging Face `rope_scaling` dict (the serve config's
        `model.rope_scaling`, vLLM's `hf_overrides={"rope_scaling": ...}`): it replaces the
        checkpoint's scaling as a whole, and `max_context_len` follows from it.
        """
        if override is None:
            return self
        _check_rope_override(override)
        params = dict(override)
        if "original_max_position_embeddings" in params:
            params["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
        cfg = {"rope_parameters": params, "rope_theta": self.rope_theta}
        _, items = _parse_rope(cfg, self.max_position_embeddings)
        return dataclasses.replace(self, rope_scaling=items)

    # ---------------------------------------------------------------- HF parsing
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        """Parse a Hugging Face `config.json` dict; raise UnsupportedModelError if unsupported."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES:
            mapped = [_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES]
            if model_type is None and mapped:
                model_type = mapped[0]
            else:
                raise UnsupportedModelError(
                    f"model_type {model_type!r} (architectures {archs}) is not supported; "
                    f"supported model_type: {', '.join(SUPPORTED_ARCHITECTURES)} "
                    f"({', '.join(_HF_ARCHITECTURES)})"
                )
        for a in archs:
            if a not in _HF_ARCHITECTURES:
                raise UnsupportedModelError(
                    f"architecture {a!r} is not supported (only causal LMs: {', '.join(_HF_ARCHITECTURES)})"
                )

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise UnsupportedModelError(f"config.json lacks required field {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; supported: silu (SwiGLU MLP)")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported; supported: bias-free MLP")
        prf = cfg.get("partial_rotary_factor")
        if prf is not None and float(prf) != 1.0:
            raise UnsupportedModelError(
                f"partial_rotary_factor {prf} is not supported; supported: 1.0 (full RoPE)"
            )

        max_pos = int(cfg.get("max_position_embeddings") or 4096)
        rope_theta, rope_scaling = _parse_rope(cfg, max_pos)
        sliding = _effective_sliding_window(cfg, model_type, max_pos)

        eos = cfg.get("eos_token_id")
        eos_ids = (
            tuple(int(x) for x in eos)
            if isinstance(eos, (list, tuple))
            else ((int(eos),) if eos is not None else ())
        )
        attention_bias = bool(cfg.get("attention_bias", False))
        # Qwen2 always biases q/k/v (never o); Llama/Qwen3 `attention_bias` biases all four
        qkv_bias = True if model_type == "qwen2" else attention_bias
        return cls(
            architecture=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=eos_ids,
            sliding_window=sliding,
            o_proj_bias=attention_bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers-5 style config.json dict describing this architecture."""
        hf_arch = {v: k for k, v in _HF_ARCHITECTURES.items()}[self.architecture]
        rope = {"rope_type": "default", **self.rope_params, "rope_theta": self.rope_theta}
        cfg: dict[str, Any] = {
            "architectures": [hf_arch],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
            ),
            "torch_dtype": "float32",
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(rope)
        if self.architecture in ("llama", "qwen3"):
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = False
        if self.architecture in ("mistral", "qwen2", "qwen3"):
            cfg["sliding_window"] = None
        if self.architecture in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        return cfg


def _parse_rope(cfg: dict[str, Any], max_pos: int) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, hashable scaling items or None) from either config layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(
            "per-layer-type rope_parameters are not supported; supported: one global RoPE"
        )
    params = dict(params or {})
    legacy = cfg.get("rope_scaling")
    if isinstance(legacy, dict):
        for k, v in legacy.items():
            params.setdefault(k, v)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "mrope":  # Qwen2-VL style alias of plain RoPE for text models
        rope_type = "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    allowed = _ROPE_KEYS[rope_type]
    items: dict[str, Any] = {"rope_type": rope_type}
    for k, v in params.items():
        if k in _ROPE_IGNORED_KEYS or v is None:
            continue
        if k not in allowed:
            raise UnsupportedModelError(
                f"rope_scaling key {k!r} is not supported for rope type {rope_type!r}; "
                f"supported keys: {', '.join(sorted(allowed))}"
            )
        items[k] = v
    if rope_type in ("llama3", "yarn"):
        items.setdefault(
            "original_max_position_embeddings", int(cfg.get("original_max_position_embeddings") or max_pos)
        )
    if rope_type != "yarn" and "factor" not in items:
        raise UnsupportedModelError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if k not in items:
                raise UnsupportedModelError(f"rope type 'llama3' needs {k!r}")
    for k, v in items.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UnsupportedModelError(f"rope_scaling {k}={v} is not finite")
    return theta, tuple(sorted(items.items()))


_SCALING_TYPES = tuple(t for t in SUPPORTED_ROPE_TYPES if t != "default")


def _check_rope_override(override: Mapping[str, Any]) -> None:
    """Refuse a rope_scaling override `_parse_rope` would read loosely: it must name a
    scaling type and a factor >= 1, and may not carry keys the type does not use."""
    example = "e.g. {rope_type: yarn, factor: 2.0, original_max_position_embeddings: 8192}"
    if not isinstance(override, Mapping):
        raise UnsupportedModelError(f"rope_scaling must be a mapping ({example}), got {override!r}")
    rope_type = override.get("rope_type", override.get("type"))
    if rope_type not in _SCALING_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(_SCALING_TYPES)} ({example})"
        )
    allowed = _ROPE_KEYS[rope_type] | {"rope_type", "type"}
    for key, value in override.items():
        if key not in allowed:
            raise UnsupportedModelError(
                f"rope_scaling key {key!r} is not supported for rope type {rope_type!r}; "
                f"supported keys: {', '.join(sorted(allowed))}"
            )
        if key in ("rope_type", "type", "truncate"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UnsupportedModelError(f"rope_scaling {key} must be a finite number, got {value!r}")
    factor = override.get("factor")
    if factor is None or factor < 1:
        raise UnsupportedModelError(f"rope_scaling factor must be a number >= 1 ({example}), got {factor!r}")
    original = override.get("original_max_position_embeddings")
    if original is not None and (int(original) != original or original < 1):
        raise UnsupportedModelError(
            f"rope_scaling original_max_position_embeddings must be an int >= 1, got {original!r}"
        )
    truncate = override.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise UnsupportedModelError(f"rope_scaling truncate must be true or false, got {truncate!r}")


def _effective_sliding_window(cfg: dict[str, Any], model_type: str, max_pos: int) -> None:
    """Refuse sliding-window attention unless the window covers the whole context."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types") or []
    if window is not None and int(window) < max_pos:
        raise UnsupportedModelError(
            f"sliding_window={window} < max_position_embeddings={max_pos}: sliding-window "
            "attention is not supported (ESP stores a request's KV as an unordered token set, "
            "architecture.md §3.2); supported: full attention (sliding_window null, or >= the context)"
        )
    if window is None and "sliding_attention" in layer_types:
        raise UnsupportedModelError("layer_types with 'sliding_attention' are not supported")
    return None


_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one instance worker. Validated at construction; read-only afterwards.

    * model: "builtin" (the random-weight byte-level Llama of `builtin.py`), the path
      of a local Hugging Face checkpoint directory (config.json + *.safetensors) or of a
      .gguf file (`model_source.resolve_model_path` turns a packaged name into one).
    * kv_slots: token slots of this instance's KV pool (one slot = one token, all layers);
      None sizes the pool from the memory budget (`memory.plan_pool`).
    * memory_budget_bytes: what this instance may use (weights + activations + KV); on
      CUDA, memory_fraction of the device's memory instead. With neither, kv_slots is used
      unchecked.
    * prefill_piece_tokens: the largest prefill piece the activation reserve must hold.
    * num_threads: torch intra-op threads (None leaves torch's default).
    * builtin_seed: seed of the builtin model's weights (ignored for checkpoints).
    * rope_scaling: a Hugging Face `rope_scaling` dict replacing the model's own
      (`ModelArch.with_rope_scaling`; None: the checkpoint's RoPE).
    * cuda_graphs: on CUDA with TP off, single-instance decode steps replay CUDA graphs
      per batch-size bucket (`decode_graph.py`); ignored on CPU.
    * fault_token / hang_token: fault injection for tests (None: off). A batch holding a
      request whose prompt contains fault_token raises inside the forward; one holding
      hang_token sleeps hang_s first (a hung instance, for the controller's watchdog).
    """

    model: str = "builtin"
    dtype: str = "float32"
    device: str = "cpu"
    kv_slots: int | None = 4096
    memory_budget_bytes: int | None = None
    memory_fraction: float | None = None
    prefill_piece_tokens: int = 16384
    num_threads: int | None = None
    attention_backend: str = "auto"
    builtin_seed: int = 0
    rope_scaling: Mapping[str, Any] | None = None
    fault_token: int | None = None
    hang_token: int | None = None
    hang_s: float = 3600.0
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("WorkerConfig.model must be 'builtin' or a local checkpoint directory")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"WorkerConfig.dtype={self.dtype!r} is not supported; "
                f"set one of {', '.join(SUPPORTED_DTYPES)}"
            )
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"WorkerConfig.device={self.device!r} is invalid; set 'cpu', 'cuda' or 'cuda:N'")
        if self.kv_slots is None and self.memory_budget_bytes is None and self.memory_fraction is None:
            raise ValueError("WorkerConfig needs kv_slots or a memory budget to size the KV pool")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ValueError(f"WorkerConfig.memory_fraction={self.memory_fraction!r} must be in (0, 1]")
        if self.kv_slots is not None and (
            isinstance(self.kv_slots, bool) or not isinstance(self.kv_slots, int) or self.kv_slots < 1
        ):
            raise ValueError(
                f"WorkerConfig.kv_slots={self.kv_slots!r} must be an int >= 1 "
                "(tokens of KV this instance can hold)"
            )
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"WorkerConfig.num_threads={self.num_threads!r} must be None or an int >= 1")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"WorkerConfig.attention_backend={self.attention_backend!r} is "
                f"unknown; set one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if not isinstance(self.builtin_seed, int):
            raise ValueError("WorkerConfig.builtin_seed must be an int")
        if self.rope_scaling is not None:
            _check_rope_override(self.rope_scaling)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"WorkerConfig.cuda_graphs={self.cuda_graphs!r} must be true or false")

    @property
    def is_builtin(self) -> bool:
        return self.model == "builtin"
