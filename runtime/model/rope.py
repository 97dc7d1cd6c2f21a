"""Rotary position embedding for MLA's rotary head dims, with DeepSeek's YaRN context extension."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeScaling, yarn_mscale


def inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [rope_dim/2] float32, attention_factor applied to cos and sin).

    Computed in float32 as the reference implementations do, so positions map to the same angles.
    """
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    yarn = config.rope_scaling
    if yarn is None:
        return 1.0 / pos_freqs, 1.0
    return _yarn_frequencies(yarn, dim, base, pos_freqs), _yarn_attention_factor(yarn)


def _yarn_attention_factor(yarn: RopeScaling) -> float:
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def _yarn_frequencies(yarn: RopeScaling, dim: int, base: float, pos_freqs: torch.Tensor) -> torch.Tensor:
    # Interpolate the low frequencies (long wavelengths) by `factor`, keep the high ones, ramp between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (yarn.factor * pos_freqs)
    return inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables by position and their application to the rotary slices of q and k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave

    def reset_buffers(self) -> None:
        self.inv_freq = inverse_frequencies(self.config)[0].to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rope_dim/2], one angle per rotated pair."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., rope_dim] with cos/sin [T, rope_dim/2] -> rotated x, same shape.

        Interleaved checkpoints (DeepSeek's own layout) rotate pairs (x0, x1), (x2, x3), ...; the result is
        written as [rotated evens, rotated odds]. Queries and keys get the same permutation, so their dot
        products are those of the interleaved rotation.
        """
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
