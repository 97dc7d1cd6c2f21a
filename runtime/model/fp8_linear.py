"""Block-scaled FP8 linear layers, as DeepSeek serves V3/R1: e4m3 weights with one float32 multiplier per
128x128 block (the checkpoint's format, kept as it is), activations quantized per token in groups of 128
(one float32 multiplier per group), products accumulated in float32.

Two paths with one contract, `y = x @ dequantize(w).T` up to the activations' FP8 rounding:
- `fp8_block_matmul_torch`: dequantizes both operands to float32 and multiplies. The CPU path and the
  reference.
- `fp8_block_matmul_triton`: one Triton kernel that reads the weight as FP8 (half the bytes of bf16) and
  runs FP8 dots (tensor cores on compute capability 8.9 and above) over one 128-wide group of K at a time,
  applying both groups' multipliers to each group's float32 partial sum before adding it to the float32
  accumulator. Applying them per group is also what keeps the accumulation exact enough: FP8 tensor-core
  dots accumulate in reduced precision within a call (DeepSeek-V3's report measured about 14 bits on
  Hopper), and each call here sums only 128 products. Under `TRITON_INTERPRET=1` it runs on CPU tensors
  (how CI tests it); the interpreter has no FP8 arithmetic, so there the tiles are upcast to float32 first,
  which gives the products an FP8 dot would (every e4m3 value is exact in float32).

`torch.nn.functional.scaled_mm` with BlockWise1x128 / BlockWise128x128 scales is cuBLAS's version of the
same GEMM on compute capability 9.0; the Triton kernel is used because the same kernel is checked in CI
on CPU and runs on every FP8-capable GPU (8.9 too).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fp8 import DEFAULT_BLOCK, E4M3_MAX, FP8_DTYPE, dequantize_blockwise, scale_shape
from .kernels import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # the serving install without Triton: the torch path is used
    triton = None

GROUP = DEFAULT_BLOCK[1]  # activations are quantized in groups of the weight blocks' width


def quantize_activations(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8_e4m3fn [M, K], float32 multipliers [M, ceil(K/group)]): each group of `group` values
    of a row scaled so that its largest magnitude maps onto e4m3's largest (448). An all-zero group gets the
    multiplier 1 (any reproduces its zeros)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected [tokens, features], got shape {tuple(x.shape)}")
    m, k = x.shape
    groups = math.ceil(k / group)
    padded = x.new_zeros((m, groups * group), dtype=torch.float32)
    padded[:, :k] = x
    blocks = padded.view(m, groups, group)
    amax = blocks.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    quantized = (blocks / scales[:, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).view(m, groups * group)[:, :k].to(FP8_DTYPE)
    return quantized.contiguous(), scales.contiguous()


def _check(x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor, w_scales: torch.Tensor) -> None:
    if x_q.dtype != FP8_DTYPE or w_q.dtype != FP8_DTYPE:
        raise ValueError(f"operands must be {FP8_DTYPE} (got {x_q.dtype} and {w_q.dtype})")
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"x [M, K] and w [N, K] do not match: {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    groups = math.ceil(x_q.shape[1] / GROUP)
    if tuple(x_scales.shape) != (x_q.shape[0], groups):
        raise ValueError(f"x_scales: expected shape {(x_q.shape[0], groups)}, got {tuple(x_scales.shape)}")
    if tuple(w_scales.shape) != scale_shape(tuple(w_q.shape)):
        raise ValueError(f"w_scales: expected shape {scale_shape(tuple(w_q.shape))}, got {tuple(w_scales.shape)}")


def fp8_block_matmul_torch(x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor, w_scales: torch.Tensor,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [M, K] and w [N, K] in FP8 with their multipliers -> [M, N]: both dequantized to float32, multiplied."""
    _check(x_q, x_scales, w_q, w_scales)
    k = x_q.shape[1]
    x = x_q.to(torch.float32) * x_scales.repeat_interleave(GROUP, dim=1)[:, :k]
    w = dequantize_blockwise(w_q, w_scales, torch.float32)
    return (x @ w.T).to(out_dtype)


if triton is not None:

    @triton.jit
    def _fp8_block_matmul_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                                 stride_xm, stride_xs, stride_wn, stride_ws, stride_ym,
                                 GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 UPCAST: tl.constexpr):
        # int64: rows x stride passes 2**31 for long prefill chunks through wide projections.
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, GROUP_K)
        row_ok, col_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, tl.cdiv(K, GROUP_K)):
            k = g * GROUP_K + rk
            k_ok = k < K
            a = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b, out_dtype=tl.float32)
            a_scale = tl.load(xs_ptr + rm * stride_xs + g, mask=row_ok, other=0.0)
            # The weight's multiplier for column n and this group: its block row is n // GROUP_K.
            b_scale = tl.load(ws_ptr + (rn // GROUP_K) * stride_ws + g, mask=col_ok, other=0.0)
            acc += part * a_scale[:, None] * b_scale[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _tiles(m: int) -> tuple[int, int, int]:
    """(block_m, block_n, num_warps): decode-sized batches stream the weight, so small row blocks and more
    column blocks (more programs to spread the weight's reads over the GPU); prefill reuses each weight tile
    across more rows."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return 64, 64, 4
    return 128, 128, 8


def fp8_block_matmul_triton(x_q: torch.Tensor, x_scales: torch.Tensor, w_q: torch.Tensor, w_scales: torch.Tensor,
                            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Triton twin of `fp8_block_matmul_torch`."""
    if triton is None:
        raise RuntimeError("the FP8 Triton kernel needs the triton package, which is not installed")
    _check(x_q, x_scales, w_q, w_scales)
    x_q, w_q = x_q.contiguous(), w_q.contiguous()
    x_scales, w_scales = x_scales.to(torch.float32).contiguous(), w_scales.to(torch.float32).contiguous()
    m, k = x_q.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, warps = _tiles(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_matmul_kernel[grid](x_q, x_scales, w_q, w_scales, y, m, n, k,
                                   x_q.stride(0), x_scales.stride(0), w_q.stride(0), w_scales.stride(0), y.stride(0),
                                   GROUP_K=GROUP, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=interpreted(),
                                   num_warps=warps)
    return y


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scales: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """x [..., K] in the model dtype through an FP8 weight [N, K] with its block multipliers -> [..., N] in x's
    dtype: the activations quantized per token in groups of 128, then the block-scaled FP8 matmul."""
    lead = x.shape[:-1]
    x_q, x_scales = quantize_activations(x.reshape(-1, x.shape[-1]))
    matmul = fp8_block_matmul_triton if kernels == "triton" else fp8_block_matmul_torch
    return matmul(x_q, x_scales, w_q, w_scales, x.dtype).reshape(*lead, w_q.shape[0])


class Fp8Linear(nn.Module):
    """A linear layer whose weight stays as the FP8 checkpoint stores it (`weight` e4m3 [out, in],
    `weight_scale_inv` float32 per 128x128 block, under the checkpoint's names): half the bytes of bf16 to hold
    and to read each step. `kernels` picks the matmul: torch (dequantizes on the fly: CPU, tests) or triton."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.ones(scale_shape((out_features, in_features)), dtype=torch.float32, device=device),
            requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.weight_scale_inv, self.kernels)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"
