"""DeepSeek-V3 FP8 block quantization: e4m3 weights with one float32 multiplier per 128x128 block."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_BLOCK = (128, 128)

# The published FP8 checkpoints quantize only the linear projections inside decoder layers; embeddings,
# lm_head, norms, the router (mlp.gate) and the MTP module's eh_proj/shared_head stay in bf16.
_QUANTIZED_NAME = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?[a-z_]*proj(_with_mqa)?\.weight$")


WEIGHT_FORMATS = ("auto", "fp8", "dequantized")


class Fp8Weight(NamedTuple):
    """A weight kept as the checkpoint stores it: e4m3 values and the float32 multiplier of each block."""

    weight: Tensor
    scale_inv: Tensor


def resolve_weight_format(choice: str, checkpoint_is_fp8: bool, device: torch.device | str) -> str:
    """auto: fp8 for an FP8 checkpoint on a GPU with FP8 tensor cores (compute capability 8.9 and above), else
    dequantized. fp8 needs an FP8 checkpoint (on any device: the CPU runs it dequantizing on the fly, for tests)."""
    if choice not in WEIGHT_FORMATS:
        raise ValueError(f"weights: must be one of {', '.join(WEIGHT_FORMATS)} (got {choice!r})")
    if choice == "fp8" and not checkpoint_is_fp8:
        raise ValueError("weights: fp8 needs a checkpoint with FP8 weights (config.json's quantization_config); "
                         "this one is not quantized: use dequantized or auto")
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    fp8_cores = capability is not None and capability >= (8, 9)
    if choice == "fp8" and capability is not None and not fp8_cores:
        raise ValueError(f"weights: fp8 needs FP8 tensor cores (compute capability 8.9 and above); this GPU has "
                         f"{capability[0]}.{capability[1]}: use dequantized or auto")
    if choice != "auto":
        return choice
    return "fp8" if checkpoint_is_fp8 and fp8_cores else "dequantized"


def is_quantized_name(name: str) -> bool:
    """Whether the published FP8 format stores tensor ``name`` as e4m3 with a ``*_scale_inv`` partner."""
    return _QUANTIZED_NAME.match(name) is not None


def kept_fp8(name: str) -> bool:
    """Whether the model with `weights: fp8` keeps tensor ``name`` in FP8: every quantized projection, routed
    experts included, but MLA's kv_b_proj (split per head by the absorbed decode path; it is small)."""
    return is_quantized_name(name) and ".kv_b_proj." not in name


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` for a 2-D weight: [ceil(out/block0), ceil(in/block1)]."""
    if len(shape) != 2:
        raise ValueError(f"block quantization needs a 2-D weight, got shape {tuple(shape)}")
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def dequantize_blockwise(
    weight_fp8: Tensor,
    scale_inv: Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> Tensor:
    """Undo block quantization.

    weight_fp8: [out, in] float8_e4m3fn; scale_inv: [ceil(out/b0), ceil(in/b1)] float32, the *multiplier*
    of each block (edge blocks may be partial). Returns [out, in] in ``dtype``, contiguous.

    Peak extra memory is one float32 copy of the weight plus the result in ``dtype``: the scale is only
    expanded along columns (1/b0 of the weight's size), and rows are scaled in place through a view.
    """
    expected = scale_shape(tuple(weight_fp8.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(weight_fp8.shape)} "
            f"with block {block}: expected {expected}"
        )
    rows, cols = weight_fp8.shape
    b0, b1 = block
    out = weight_fp8.to(torch.float32)
    # [n_row_blocks, cols]: each row block's multipliers spread over its columns.
    col_scale = scale_inv.to(torch.float32).repeat_interleave(b1, dim=1)[:, :cols]
    full = rows // b0
    if full:
        out[: full * b0].view(full, b0, cols).mul_(col_scale[:full, None, :])
    if rows % b0:
        out[full * b0 :].mul_(col_scale[full])
    return out if dtype == torch.float32 else out.to(dtype)


def quantize_blockwise(weight: Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Quantize [out, in] to (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/b0), ceil(in/b1)]).

    Each block's scale_inv is amax/448 so the block's largest magnitude maps onto e4m3's largest value.
    """
    rows, cols = weight.shape if weight.dim() == 2 else (None, None)
    n0, n1 = scale_shape(tuple(weight.shape), block)
    b0, b1 = block
    padded = torch.zeros(n0 * b0, n1 * b1, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight
    blocks = padded.view(n0, b0, n1, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    # An all-zero block would divide by zero; any multiplier reproduces zeros, so use 1.
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    blocks.div_(scale_inv[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    quantized = padded[:rows, :cols].contiguous().to(FP8_DTYPE)
    return quantized, scale_inv.contiguous()
