"""FP8 block quantization: round trips, partial edge blocks, and the scale-is-a-multiplier convention."""

from __future__ import annotations

import math

import pytest
import torch

from r1serve.runtime.model.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    dequantize_blockwise,
    is_quantized_name,
    quantize_blockwise,
    scale_shape,
)


def reference_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Element by element: each entry times the multiplier of the block it falls in."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = weight[rs, cs].to(torch.float32) * scale_inv[i, j]
    return out


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (1, 1), (129, 127), (64, 300)])
def test_round_trip_error_is_small(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    q, scale_inv = quantize_blockwise(weight)
    assert q.dtype == FP8_DTYPE and q.shape == weight.shape and q.is_contiguous()
    assert scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    restored = dequantize_blockwise(q, scale_inv, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error per element is at most 2^-4 of the block's scale range.
    rel = (restored - weight).abs().max() / weight.abs().max()
    assert rel < 0.07
    assert torch.allclose(restored, weight, rtol=0.07, atol=weight.abs().max().item() / 448 * 8)


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (5, 260)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dequantize_matches_reference(shape, dtype):
    torch.manual_seed(1)
    q = (torch.randn(shape) * 50).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    scale_inv = torch.rand(scale_shape(shape)) + 0.1
    got = dequantize_blockwise(q, scale_inv, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, reference_dequantize(q, scale_inv).to(dtype))


def test_scale_is_a_multiplier():
    q = torch.ones(130, 130).to(FP8_DTYPE)
    scale_inv = torch.tensor([[2.0, 3.0], [5.0, 7.0]])
    out = dequantize_blockwise(q, scale_inv, torch.float32)
    assert out[0, 0] == 2.0 and out[0, 129] == 3.0 and out[129, 0] == 5.0 and out[129, 129] == 7.0


def test_quantize_uses_full_e4m3_range_per_block():
    weight = torch.zeros(256, 128)
    weight[0, 0] = 3.0
    weight[200, 5] = -0.5
    q, scale_inv = quantize_blockwise(weight)
    torch.testing.assert_close(scale_inv, torch.tensor([[3.0 / 448], [0.5 / 448]]))
    assert q[0, 0].float() == 448 and q[200, 5].float() == -448


def test_zero_blocks_are_guarded():
    weight = torch.zeros(200, 200)
    weight[150:, 150:] = 1.0
    q, scale_inv = quantize_blockwise(weight)
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    assert not torch.isnan(q.float()).any()
    torch.testing.assert_close(dequantize_blockwise(q, scale_inv, torch.float32), weight)


def test_custom_block_size():
    torch.manual_seed(2)
    weight = torch.randn(70, 50)
    q, scale_inv = quantize_blockwise(weight, block=(32, 16))
    assert tuple(scale_inv.shape) == (3, 4)
    restored = dequantize_blockwise(q, scale_inv, torch.float32, block=(32, 16))
    torch.testing.assert_close(restored, reference_dequantize(q, scale_inv, (32, 16)))
    assert (restored - weight).abs().max() < 0.07 * weight.abs().max()


def test_mismatched_scale_shape_is_rejected():
    q = torch.zeros(256, 256).to(FP8_DTYPE)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        dequantize_blockwise(q, torch.ones(1, 2), torch.float32)


@pytest.mark.parametrize(
    ("name", "quantized"),
    [
        ("model.layers.0.self_attn.q_a_proj.weight", True),
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.layers.3.self_attn.kv_a_proj_with_mqa.weight", True),
        ("model.layers.3.self_attn.kv_b_proj.weight", True),
        ("model.layers.3.self_attn.o_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", True),
        ("model.layers.5.mlp.experts.17.gate_proj.weight", True),
        ("model.layers.5.mlp.shared_experts.up_proj.weight", True),
        ("model.layers.5.mlp.gate.weight", False),
        ("model.layers.5.mlp.gate.e_score_correction_bias", False),
        ("model.layers.5.self_attn.kv_a_layernorm.weight", False),
        ("model.layers.5.input_layernorm.weight", False),
        ("model.layers.61.eh_proj.weight", False),
        ("model.layers.61.shared_head.head.weight", False),
        ("model.embed_tokens.weight", False),
        ("lm_head.weight", False),
        ("model.norm.weight", False),
    ],
)
def test_which_names_are_quantized(name, quantized):
    assert is_quantized_name(name) is quantized
