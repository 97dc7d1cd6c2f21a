"""Routed experts with FP8 weights: the Triton kernels (under Triton's interpreter on CPU) against the torch
reference with the same arithmetic, and both against float32 experts on the dequantized weights.

Bounds, and why (see test_fp8_linear.py for the single matmul):
- Kernels against the reference: relative error at most 2^-8, the rounding of one bf16 operand. The order of
  float32 sums differs, and an intermediate activation that lands on the other side of an e4m3 rounding
  boundary moves that one value by an e4m3 step; both stay far below it.
- Against float32 experts on unquantized activations: at most 0.08. Two activations are rounded to e4m3 on
  the way (the copies before gate/up, the intermediate before down), each moving values by at most 2^-4,
  about 0.036 RMS each.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r1serve.runtime.model.fp8 import dequantize_blockwise, quantize_blockwise
from r1serve.runtime.model.fp8_moe import check_fp8_experts, fp8_experts_torch, fp8_experts_triton

pytest.importorskip("triton")

KERNEL_BOUND = 2.0 ** -8
DEQUANTIZED_BOUND = 0.08


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _experts(num_slots: int, hidden: int, intermediate: int, generator: torch.Generator):
    w13, w13_scales, w2, w2_scales = [], [], [], []
    def blocks_apart(rows: int, cols: int) -> torch.Tensor:
        # Blocks of different magnitudes, as trained weights have: a wrong multiplier is far off.
        weight = torch.randn(rows, cols, generator=generator) / cols ** 0.5
        return weight * (0.2 + 2 * torch.rand(rows // 64 + 1, 1, generator=generator)).repeat_interleave(64, 0)[:rows]

    for _ in range(num_slots):
        q, s = quantize_blockwise(blocks_apart(2 * intermediate, hidden))
        w13.append(q)
        w13_scales.append(s)
        q, s = quantize_blockwise(blocks_apart(hidden, intermediate))
        w2.append(q)
        w2_scales.append(s)
    return torch.stack(w13), torch.stack(w13_scales), torch.stack(w2), torch.stack(w2_scales)


def _float32_experts(x, slots, w13, w13_scales, w2, w2_scales):
    intermediate = w2.shape[2]
    out = torch.empty_like(x)
    for j in range(x.shape[0]):
        s = int(slots[j])
        gate_up = x[j] @ dequantize_blockwise(w13[s], w13_scales[s], torch.float32).T
        h = F.silu(gate_up[:intermediate]) * gate_up[intermediate:]
        out[j] = h @ dequantize_blockwise(w2[s], w2_scales[s], torch.float32).T
    return out


# (copies, slots, hidden, intermediate): decode- and prefill-sized copies per slot, hidden not a multiple of 128.
# The last case gives each slot over 64 copies: the prefill tiles (128 columns per program).
CASES = [(3, 4, 200, 128), (40, 5, 256, 256), (150, 3, 130, 128), (300, 3, 256, 256)]


@pytest.mark.parametrize("copies, num_slots, hidden, intermediate", CASES)
def test_the_fp8_expert_kernels_give_the_reference_and_stay_near_float32_experts(copies, num_slots, hidden,
                                                                                 intermediate):
    generator = torch.Generator().manual_seed(copies + hidden)
    weights = _experts(num_slots, hidden, intermediate, generator)
    x = torch.randn(copies, hidden, generator=generator)
    slots = torch.randint(0, num_slots - 1, (copies,), generator=generator)  # the last slot gets nothing
    reference = fp8_experts_torch(x, slots, *weights)
    got = fp8_experts_triton(x, slots, *weights)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert _relative_error(got, reference) <= KERNEL_BOUND
    assert _relative_error(reference, _float32_experts(x, slots, *weights)) <= DEQUANTIZED_BOUND


def test_gate_and_up_blocks_must_stack_and_multipliers_must_fit_their_weights():
    check_fp8_experts(256)
    w13, w13_scales, w2, w2_scales = _experts(2, 128, 128, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"w2_scales: expected shape \(2, 1, 1\), got \(2, 1, 2\)"):
        fp8_experts_triton(torch.randn(3, 128), torch.zeros(3, dtype=torch.long), w13, w13_scales, w2,
                           w2_scales.repeat(1, 1, 2))
    with pytest.raises(ValueError, match="moe_intermediate_size is a multiple of 128 \\(got 96\\)"):
        check_fp8_experts(96)


def test_a_rank_that_receives_no_copies_returns_none():
    """An expert-parallel rank's experts often get no token copies in a step."""
    weights = _experts(2, 128, 128, torch.Generator().manual_seed(0))
    for experts in (fp8_experts_torch, fp8_experts_triton):
        out = experts(torch.empty(0, 128), torch.empty(0, dtype=torch.long), *weights)
        assert out.shape == (0, 128)
