"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) with injectable attention.

ESP replaces attention without touching the model: the forward pass calls an
`AttentionFn(layer_idx, q, k, v) -> o` per layer, with RoPE already applied to q and k
from each token's *global* position. Local execution passes a function that reads and
writes the KV pool; ring prefill and multi-master decode pass their own. The pieces of a
layer (`embed`, `layer_qkv`, `layer_post_attention`, `final_norm`, `compute_logits`) are
public so a decode master can run the dense work while holders only do attention.

Weights are plain tensors (no nn.Module, no autograd): q/k/v and gate/up projections are
fused into one matrix each so a layer is four GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from esp_core.runtime.config import ModelArch
from esp_core.runtime.rope import RotaryEmbedding, apply_rope

if TYPE_CHECKING:
    from esp_core.runtime.tensor_parallel import TPContext

# (layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> o [T, Hq, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_weight_names(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of `arch` must hold, with its shape."""
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        names["lm_head.weight"] = (v, h)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        names[p + "self_attn.q_proj.weight"] = (arch.q_size, h)
        names[p + "self_attn.k_proj.weight"] = (arch.kv_size, h)
        names[p + "self_attn.v_proj.weight"] = (arch.kv_size, h)
        names[p + "self_attn.o_proj.weight"] = (h, arch.q_size)
        if arch.qkv_bias:
            names[p + "self_attn.q_proj.bias"] = (arch.q_size,)
            names[p + "self_attn.k_proj.bias"] = (arch.kv_size,)
            names[p + "self_attn.v_proj.bias"] = (arch.kv_size,)
        if arch.o_proj_bias:
            names[p + "self_attn.o_proj.bias"] = (h,)
        if arch.qk_norm:
            names[p + "self_attn.q_norm.weight"] = (arch.head_dim,)
            names[p + "self_attn.k_norm.weight"] = (arch.head_dim,)
        names[p + "mlp.gate_proj.weight"] = (i, h)
        names[p + "mlp.up_proj.weight"] = (i, h)
        names[p + "mlp.down_proj.weight"] = (h, i)
        names[p + "input_layernorm.weight"] = (h,)
        names[p + "post_attention_layernorm.weight"] = (h,)
    return names


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    w_qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, H]
    b_qkv: torch.Tensor | None  # [(Hq + 2 Hkv) * D]
    w_o: torch.Tensor  # [H, Hq * D]
    b_o: torch.Tensor | None  # [H]
    post_norm: torch.Tensor  # [H]
    w_gate_up: torch.Tensor  # [2 I, H]
    w_down: torch.Tensor  # [H, I]
    q_norm: torch.Tensor | None = None  # [D] (Qwen3: per-head RMSNorm of q and k)
    k_norm: torch.Tensor | None = None  # [D]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale (in the input dtype)."""
    if x.dtype == torch.float32:  # the casts are no-ops: skip their calls (per layer, per step)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def check_step_inputs(arch: ModelArch, request_id: str, token_ids: Sequence[int], end_position: int) -> None:
    """Refuse a request's inputs to a step: token ids outside [0, vocab_size) or positions
    up to `end_position` (exclusive) beyond the model's context.

    Called where a step's inputs are assembled, on the host ints of the plan and the
    request state, before any tensor is built: the forward pass itself never reads a value
    back from the device (on a GPU each such read would stall the step until the device
    catches up).
    """
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= arch.vocab_size):
        bad = next(t for t in token_ids if not 0 <= t < arch.vocab_size)
        raise ValueError(f"request {request_id!r}: token id {bad} out of range [0, {arch.vocab_size})")
    if end_position > arch.max_context_len:
        raise ValueError(
            f"request {request_id!r}: position {end_position - 1} is outside the model's context "
            f"[0, {arch.max_context_len})"
        )


class CausalLM:
    """A Llama-family decoder on one device. All methods run under inference mode."""

    def __init__(
        self,
        arch: ModelArch,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp: TPContext | None = None,
    ) -> None:
        # With tensor parallelism `arch` becomes this rank's shard (its heads, its MLP
        # width) and `weights` may be full or already sharded; tp=None is TP 1.
        self.tp = tp
        full_arch, full_shapes = arch, hf_weight_names(arch)
        expected = full_shapes
        if tp is not None:
            from esp_core.runtime.tp_shapes import local_arch

            arch, expected = local_arch(arch, tp.size), tp.local_shapes(arch, full_shapes)
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)
        missing = [n for n in expected if n not in weights]
        if missing:
            raise ValueError(f"missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

        def get(name: str) -> torch.Tensor:
            t = weights[name]
            if tp is not None:
                t = tp.take(full_arch, name, t, full_shapes[name])
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {expected[name]}")
            return t.to(device=self.device, dtype=dtype)

        self.embed_tokens = get("model.embed_tokens.weight")  # [V, H]
        self.lm_head = self.embed_tokens if arch.tie_word_embeddings else get("lm_head.weight")
        self.norm = get("model.norm.weight")
        self.layers: list[LayerWeights] = []
        for layer in range(arch.num_layers):
            p = f"model.layers.{layer}."
            a = p + "self_attn."
            b_qkv = (
                torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")])
                if arch.qkv_bias
                else None
            )
            self.layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    w_qkv=torch.cat(
                        [get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]
                    ),
                    b_qkv=b_qkv,
                    w_o=get(a + "o_proj.weight"),
                    # row-parallel o_proj: its bias is added once, by TP rank 0, before the sum
                    b_o=get(a + "o_proj.bias") if arch.o_proj_bias and (tp is None or tp.rank == 0) else None,
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                    w_down=get(p + "mlp.down_proj.weight"),
                    q_norm=get(a + "q_norm.weight") if arch.qk_norm else None,
                    k_norm=get(a + "k_norm.weight") if arch.qk_norm else None,
                )
            )
        self.rotary = RotaryEmbedding(arch, self.device)
        self.scale = arch.head_dim**-0.5

    # ------------------------------------------------------------------ pieces
    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] int64 in [0, vocab_size) (`check_step_inputs`) -> hidden [T, H]."""
        if self.tp is not None:
            return self.tp.embed(token_ids.to(self.device), self.embed_tokens, self.arch.vocab_size)
        return F.embedding(token_ids.to(self.device), self.embed_tokens)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 (global) -> (cos, sin) [T, D/2] fp32, shared by all layers.

        Positions must lie in [0, arch.max_context_len): the model's context
        (`check_step_inputs`).
        """
        return self.rotary.cos_sin(positions.to(self.device))

    @torch.inference_mode()
    def layer_qkv(
        self, layer_idx: int, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, QKV projection and RoPE of one layer.

        hidden [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] (model dtype).
        """
        return self._layer_qkv(layer_idx, hidden, cos_sin)

    # The undecorated bodies: `forward` runs under one inference mode and calls these, so
    # a step does not enter and leave inference mode three times per layer (a Python
    # context manager each time: ~5% of a batch-1 decode step on CPU).
    def _layer_qkv(
        self, layer_idx: int, hidden: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, lw = self.arch, self.layers[layer_idx]
        x = rms_norm(hidden, lw.input_norm, a.rms_norm_eps)
        qkv = F.linear(x, lw.w_qkv, lw.b_qkv)  # [T, (Hq + 2 Hkv) * D]
        t, qk_size = hidden.shape[0], a.q_size + a.kv_size
        v = qkv[:, qk_size:].reshape(t, a.num_kv_heads, a.head_dim)
        cos, sin = cos_sin
        if lw.q_norm is None:
            # q and k sit side by side in qkv and take the same rotation: one RoPE call for
            # both halves the ~12 small ops it costs (a batch-1 CPU decode step is mostly
            # such per-op overhead: -8% per step, the same values bit for bit)
            q_and_k = qkv[:, :qk_size].reshape(t, a.num_heads + a.num_kv_heads, a.head_dim)
            q, k = apply_rope(q_and_k, cos, sin).split([a.num_heads, a.num_kv_heads], dim=1)
        else:  # Qwen3: each head's q and k normalised (with their own weights) before RoPE
            q = rms_norm(qkv[:, : a.q_size].reshape(t, a.num_heads, a.head_dim), lw.q_norm, a.rms_norm_eps)
            k = rms_norm(
                qkv[:, a.q_size : qk_size].reshape(t, a.num_kv_heads, a.head_dim), lw.k_norm, a.rms_norm_eps
            )
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.contiguous(), k.contiguous(), v.contiguous()

    @torch.inference_mode()
    def layer_post_attention(
        self, layer_idx: int, hidden: torch.Tensor, attn_out: torch.Tensor
    ) -> torch.Tensor:
        """Output projection + residual, post-attention norm, SwiGLU MLP + residual.

        hidden [T, H] (the layer's input), attn_out [T, Hq, D] -> hidden [T, H].
        """
        return self._layer_post_attention(layer_idx, hidden, attn_out)

    def _layer_post_attention(
        self, layer_idx: int, hidden: torch.Tensor, attn_out: torch.Tensor
    ) -> torch.Tensor:
        lw = self.layers[layer_idx]
        t = hidden.shape[0]
        # explicit width: an instance may own 0 tokens of a ring prefill (fewer tokens
        # than instances), and reshape(0, -1) is ambiguous
        o = F.linear(
            attn_out.reshape(t, attn_out.shape[1] * attn_out.shape[2]).to(self.dtype), lw.w_o, lw.b_o
        )
        h = hidden + (o if self.tp is None else self.tp.all_reduce(o))
        x = rms_norm(h, lw.post_norm, self.arch.rms_norm_eps)
        gate, up = F.linear(x, lw.w_gate_up).chunk(2, dim=-1)  # [T, I] each (I of this TP rank)
        down = F.linear(F.silu(gate) * up, lw.w_down)
        return h + (down if self.tp is None else self.tp.all_reduce(down))

    @torch.inference_mode()
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.norm, self.arch.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed rows: hidden [n, H] (output of `forward`) -> [n, V] fp32."""
        logits = F.linear(hidden, self.lm_head)  # [n, V] (TP: [n, this rank's vocab rows])
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits, self.arch.vocab_size)
        return logits.float()

    # ------------------------------------------------------------------ whole pass
    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """token_ids [T], positions [T] (global, int64) -> final-normed hidden [T, H].

        `attn(layer_idx, q, k, v)` computes the attention output of these T tokens (it
        decides what else they see: cached KV, peers' KV, the causal mask).
        """
        if token_ids.shape != positions.shape or token_ids.dim() != 1:
            raise ValueError(
                f"token_ids {tuple(token_ids.shape)} and positions "
                f"{tuple(positions.shape)} must be equal 1-D shapes"
            )
        hidden = self.embed(token_ids)
        cos_sin = self.rope(positions)
        for layer_idx in range(self.arch.num_layers):
            q, k, v = self._layer_qkv(layer_idx, hidden, cos_sin)
            o = attn(layer_idx, q, k, v)
            hidden = self._layer_post_attention(layer_idx, hidden, o)
        return rms_norm(hidden, self.norm, self.arch.rms_norm_eps)
