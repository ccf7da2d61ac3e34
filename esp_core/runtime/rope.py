"""Rotary position embeddings for every supported `rope_scaling` type.

ESP computes RoPE per token from its *global* position, on whichever instance holds the
token, and caches K after RoPE. So the rotation of a position must be a fixed function of
that position: no per-batch or per-sequence-length state. That holds for default, linear,
llama3 and yarn. Hugging Face's "dynamic" NTK rescales the base from the current sequence
length, which changes the rotation of tokens already cached; like vLLM we freeze it at the
longest supported length (`max_position_embeddings * factor` = `arch.max_context_len`). It then equals HF exactly
for a forward pass whose last position is `max_position_embeddings * factor - 1`.

Angles are computed in float64 (position * inv_freq), then cos/sin go to fp32: at
position 131072 an fp32 product loses ~1e-2 rad on the fastest frequency.
"""

from __future__ import annotations

import math

import torch

from esp_core.runtime.config import ModelArch


def inv_freq_and_scale(arch: ModelArch) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float64, attention factor multiplying cos and sin)."""
    dim = arch.head_dim
    base = float(arch.rope_theta)
    p = arch.rope_params
    kind = arch.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # [dim/2]
    attention_factor = 1.0
    if kind == "dynamic":
        factor = float(p["factor"])
        seq_len = arch.max_position_embeddings * factor
        base = base * ((factor * seq_len / arch.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        inv_freq = inv_freq / float(p["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, p)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(base, dim, arch, p)
    return inv_freq, attention_factor


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, arch: ModelArch, p: dict) -> tuple[torch.Tensor, float]:
    orig = float(p["original_max_position_embeddings"])
    factor = p.get("factor")
    factor = arch.max_position_embeddings / orig if factor is None else float(factor)
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1
    truncate = p.get("truncate", True)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_extra = 1 - ramp
    inv_freq = interpolation * (1 - keep_extra) + extrapolation * keep_extra
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables computed on demand for arbitrary (striped, unordered) positions."""

    def __init__(self, arch: ModelArch, device: torch.device) -> None:
        inv_freq, self.attention_factor = inv_freq_and_scale(arch)
        self.device = device
        # float64 is not supported on every accelerator backend for all ops; keep the
        # angle product on CPU-safe float64 when possible, else fall back to fp32.
        self._f64 = device.type in ("cpu", "cuda")
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float64 if self._f64 else torch.float32)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, head_dim/2] fp32 (attention factor applied)."""
        angles = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # [T, D/2]
        cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by (cos, sin) [T, D/2] in fp32, HF's rotate_half layout."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D/2]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)
