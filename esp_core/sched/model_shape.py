"""The transformer's shape as the cost model sees it: FLOPs and bytes per token.

Only counts live here (no timing): the cost model turns them into seconds with a
`HardwareSpec`. Presets: Llama-2-7B (the LoongServe paper's LWM-1M-Text) and the tiny
built-in model the CPU server ships with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for f in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "dtype_bytes",
        ):
            if getattr(self, f) < 1:
                raise ValueError(f"ModelShape.{f} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    # ---- sizes -----------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer (what a ring step moves per token)."""
        return 2 * self.kv_size * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers: 0.5 MiB for Llama-2-7B."""
        return self.num_layers * self.kv_bytes_per_token_per_layer

    @property
    def params_per_layer(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down (SwiGLU)
        return attn + mlp

    @property
    def num_params(self) -> int:
        # untied input embedding and LM head (Llama); norms are negligible
        return self.num_layers * self.params_per_layer + 2 * self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    # ---- FLOPs -----------------------------------------------------------------------

    @property
    def dense_flops_per_token(self) -> float:
        """Matmul FLOPs of one token through all layers, without attention scores and
        without the LM head (only sampled tokens run it): 2 FLOPs per weight."""
        return 2.0 * self.num_layers * self.params_per_layer

    @property
    def lm_head_flops(self) -> float:
        return 2.0 * self.hidden_size * self.vocab_size

    def attention_flops(self, sum_len_sq: float, causal: bool = True) -> float:
        """Score and value FLOPs of self-attention over sequences with Σ L² = sum_len_sq.

        Each (query, key) pair costs 2·d for q·k and 2·d for p·v per layer (d = heads x
        head_dim); a causal mask keeps about half the pairs.
        """
        pairs = sum_len_sq / 2.0 if causal else float(sum_len_sq)
        return 4.0 * self.q_size * self.num_layers * pairs

    def cross_attention_flops(self, num_queries: float, num_keys: float) -> float:
        """Queries attending to every one of `num_keys` cached keys (no mask)."""
        return 4.0 * self.q_size * self.num_layers * float(num_queries) * float(num_keys)

    # ---- presets ---------------------------------------------------------------------

    @classmethod
    def llama2_7b(cls) -> ModelShape:
        """Llama-2-7B / LWM-1M-Text (fp16, MHA): the paper's model."""
        return cls(
            name="llama2-7b",
            num_layers=32,
            hidden_size=4096,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            intermediate_size=11008,
            vocab_size=32000,
            dtype_bytes=2,
        )

    @classmethod
    def builtin_tiny(cls) -> ModelShape:
        """The small built-in model the CPU server runs (fp32)."""
        return cls(
            name="builtin-tiny",
            num_layers=4,
            hidden_size=256,
            num_heads=8,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=768,
            vocab_size=258,
            dtype_bytes=4,
        )

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        presets = {"llama2-7b": cls.llama2_7b, "lwm-1m-text": cls.llama2_7b, "builtin-tiny": cls.builtin_tiny}
        try:
            return presets[name]()
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(presets)}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        return cls(**d)
