"""Small building blocks shared by attention and MoE: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least float32: bf16 squares lose too much to be stable.
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def linear(in_features: int, out_features: int, dtype: torch.dtype, device=None, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    layer.requires_grad_(False)
    return layer


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate, dtype, device)
        self.up_proj = linear(hidden, intermediate, dtype, device)
        self.down_proj = linear(intermediate, hidden, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]"""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
