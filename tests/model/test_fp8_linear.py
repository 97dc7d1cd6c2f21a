"""Block-scaled FP8 linear layers: the Triton kernel (under Triton's interpreter on CPU) against the torch path,
which dequantizes both operands to float32, on fresh random inputs with partial 128-blocks at every edge; and
the whole FP8 linear (activations quantized per token in groups of 128) against the float32 matmul with the
dequantized weight.

Bounds, and why:
- Kernel against the dequantized float32 matmul of the same FP8 operands: relative error at most 2^-8, the
  rounding of one bf16 operand. Every e4m3 product is exact in float32, so what differs is the order of the
  float32 sums and, on a GPU, the reduced-precision accumulation of FP8 tensor-core dots within one 128-wide
  group (about 2^-14, as DeepSeek-V3's report measured on Hopper), which the kernel bounds by applying the
  multipliers and adding into float32 once per group.
- FP8 linear against float32 activations: relative error at most 0.05. Rounding to e4m3 (3 mantissa bits)
  moves each activation by at most 2^-4 of itself; independent errors give outputs a relative error near
  their RMS, 2^-4/sqrt(3) ~ 0.036 or less.
"""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.model.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_blockwise
from r1serve.runtime.model.fp8_linear import (
    fp8_block_matmul_torch,
    fp8_block_matmul_triton,
    fp8_linear,
    quantize_activations,
)

pytest.importorskip("triton")

# (tokens, out features, in features): partial 128-blocks in K and N, row counts on each tile size's edge.
SHAPES = [(1, 200, 300), (5, 128, 256), (17, 64, 129), (70, 130, 250), (129, 96, 384)]
KERNEL_BOUND = 2.0 ** -8
LINEAR_BOUND = 0.05


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _weight(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Blocks of different magnitudes, as trained weights have: the multipliers differ per block.
    w = torch.randn(n, k, generator=generator) * torch.rand(n // 64 + 1, 1, generator=generator).repeat_interleave(
        64, dim=0)[:n]
    return quantize_blockwise(w)


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_the_fp8_kernel_gives_the_dequantized_float32_matmul(m, n, k):
    generator = torch.Generator().manual_seed(m * 1000 + n + k)
    w_q, w_scales = _weight(n, k, generator)
    x_q, x_scales = quantize_activations(torch.randn(m, k, generator=generator) * 3)
    want = fp8_block_matmul_torch(x_q, x_scales, w_q, w_scales)
    got = fp8_block_matmul_triton(x_q, x_scales, w_q, w_scales)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert _relative_error(got, want) <= KERNEL_BOUND
    # Every output, not only the norm: a wrong multiplier for one block would hide in the sum.
    assert torch.allclose(got, want, rtol=KERNEL_BOUND, atol=KERNEL_BOUND * float(want.abs().mean()))


def test_the_fp8_kernel_writes_the_callers_dtype():
    generator = torch.Generator().manual_seed(3)
    w_q, w_scales = _weight(96, 200, generator)
    x_q, x_scales = quantize_activations(torch.randn(3, 200, generator=generator))
    got = fp8_block_matmul_triton(x_q, x_scales, w_q, w_scales, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert _relative_error(got, fp8_block_matmul_torch(x_q, x_scales, w_q, w_scales)) <= KERNEL_BOUND


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_an_fp8_linear_layer_matches_float32_activations_within_e4m3_rounding(kernels):
    generator = torch.Generator().manual_seed(11)
    w_q, w_scales = _weight(160, 300, generator)
    x = torch.randn(2, 7, 300, generator=generator)
    y = fp8_linear(x, w_q, w_scales, kernels)
    want = x @ dequantize_blockwise(w_q, w_scales, torch.float32).T
    assert y.shape == (2, 7, 160) and y.dtype == x.dtype
    assert _relative_error(y, want) <= LINEAR_BOUND


def test_activations_quantize_per_token_in_groups_of_128():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, generator=generator) * torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None]
    x_q, scales = quantize_activations(x)
    assert x_q.dtype == FP8_DTYPE and scales.shape == (4, 3)
    # Each group's largest magnitude maps onto 448; an all-zero row keeps multiplier 1.
    assert torch.equal(scales[3], torch.ones(3))
    back = x_q.float() * scales.repeat_interleave(128, dim=1)[:, :300]
    spacing = scales.repeat_interleave(128, dim=1)[:, :300] * 2.0 ** -10  # half the subnormal spacing
    assert bool(((back - x).abs() <= torch.maximum(x.abs() * 2.0 ** -4, spacing)).all())


def test_mismatched_operands_are_refused_naming_what_is_wrong():
    w_q, w_scales = quantize_blockwise(torch.randn(64, 256))
    x_q, x_scales = quantize_activations(torch.randn(2, 256))
    with pytest.raises(ValueError, match="operands must be"):
        fp8_block_matmul_torch(x_q.float(), x_scales, w_q, w_scales)
    with pytest.raises(ValueError, match=r"do not match: \(2, 128\) and \(64, 256\)"):
        fp8_block_matmul_triton(x_q[:, :128], x_scales[:, :1], w_q, w_scales)
    with pytest.raises(ValueError, match="w_scales: expected shape"):
        fp8_block_matmul_triton(x_q, x_scales, w_q, w_scales[:, :1])
    with pytest.raises(ValueError, match=r"x: expected \[tokens, features\]"):
        quantize_activations(torch.randn(256))
