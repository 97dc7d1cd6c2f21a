"""Routed experts with FP8 weights: the fused MoE's FP8 twin.

Same contract as `fused_moe.fused_experts` (x [N, hidden] token copies, slots [N] -> [N, hidden] unweighted
expert outputs), with each slot's weights as the FP8 checkpoint stores them: w13 [S, 2*I, hidden] and w2
[S, hidden, I] in e4m3, and one float32 multiplier per 128x128 block of each slot's matrices
(w13_scales [S, 2*I/128, ceil(hidden/128)], w2_scales [S, ceil(hidden/128), ceil(I/128)]). Gate and up
are separate checkpoint tensors stacked in w13, so their block grids stack only when I is a multiple of 128
(DeepSeek-V3: 2048); `check_fp8_experts` says so otherwise.

As in the FP8 linear layer, activations are quantized per token in groups of 128 (the copies before gate/up,
the intermediate activation before down) and each 128-wide group's float32 partial sum is scaled by both
multipliers. `fp8_experts_torch` does exactly that arithmetic with dequantized tensors: the CPU path and the
reference of the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import FP8_DTYPE, dequantize_blockwise, scale_shape
from .fp8_linear import GROUP, quantize_activations
from .fused_moe import align_to_blocks, tiles_for
from .kernels import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # the serving install without Triton: the torch path is used
    triton = None


def check_fp8_experts(intermediate: int) -> None:
    if intermediate % GROUP:
        raise ValueError(f"weights: fp8 keeps routed experts in FP8 only when moe_intermediate_size is a multiple "
                         f"of {GROUP} (got {intermediate}): gate and up blocks would not stack")


def _dequantized(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels see it: quantized per token in groups of 128, back in float32."""
    x_q, scales = quantize_activations(x)
    return x_q.to(torch.float32) * scales.repeat_interleave(GROUP, dim=1)[:, : x.shape[1]]


def fp8_experts_torch(x: torch.Tensor, slots: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor,
                      w2: torch.Tensor, w2_scales: torch.Tensor) -> torch.Tensor:
    """The reference: per used slot, its weights dequantized to float32 and the activations rounded to FP8."""
    intermediate = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xs = _dequantized(x)
    for slot in torch.unique(slots).tolist():
        rows = (slots == slot).nonzero().squeeze(1)
        gate_up = xs[rows] @ dequantize_blockwise(w13[slot], w13_scales[slot], torch.float32).T
        h = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        out[rows] = _dequantized(h.to(x.dtype)) @ dequantize_blockwise(w2[slot], w2_scales[slot], torch.float32).T
    return out.to(x.dtype)


def fp8_experts_triton(x: torch.Tensor, slots: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor,
                       w2: torch.Tensor, w2_scales: torch.Tensor) -> torch.Tensor:
    """The Triton twin of `fp8_experts_torch`: weights read as FP8, only for slots that received copies."""
    if triton is None:
        raise RuntimeError("the FP8 expert kernels need the triton package, which is not installed")
    n, hidden = x.shape
    num_slots, intermediate = w13.shape[0], w2.shape[2]
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"w13 and w2 must be {FP8_DTYPE} (got {w13.dtype} and {w2.dtype})")
    if w13.shape != (num_slots, 2 * intermediate, hidden) or w2.shape != (num_slots, hidden, intermediate):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match hidden={hidden}")
    check_fp8_experts(intermediate)
    for name, scales, weight in (("w13_scales", w13_scales, w13), ("w2_scales", w2_scales, w2)):
        expected = (num_slots, *scale_shape(tuple(weight.shape[1:])))
        if tuple(scales.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(scales.shape)}")
    out = torch.empty_like(x)
    if n == 0:
        return out
    tiles = tiles_for(n, num_slots)
    sorted_ids, block_slot = align_to_blocks(slots, num_slots, tiles.block_m)
    num_blocks = block_slot.numel()
    x_q, x_scales = quantize_activations(x)
    # Padding rows stay zero, so quantizing h never meets uninitialised memory.
    h = torch.zeros(sorted_ids.numel(), intermediate, dtype=x.dtype, device=x.device)
    # BLOCK_N divides 128, so a tile's columns share one block row of multipliers; the bf16 kernels' stage count
    # keeps shared memory within compute capability 8.9's limit.
    options = {"BLOCK_M": tiles.block_m, "BLOCK_N": min(tiles.block_n, GROUP), "GROUP_K": GROUP,
               "UPCAST": interpreted(), "num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    w13_scales, w2_scales = w13_scales.to(torch.float32).contiguous(), w2_scales.to(torch.float32).contiguous()
    _fp8_gate_up_kernel[(num_blocks, triton.cdiv(intermediate, options["BLOCK_N"]))](
        x_q, x_scales, w13, w13_scales, h, sorted_ids, block_slot, n, hidden, intermediate,
        x_q.stride(0), x_scales.stride(0), w13.stride(0), w13.stride(1), w13_scales.stride(0),
        w13_scales.stride(1), h.stride(0), **options,
    )
    h_q, h_scales = quantize_activations(h)
    _fp8_down_kernel[(num_blocks, triton.cdiv(hidden, options["BLOCK_N"]))](
        h_q, h_scales, w2, w2_scales, out, sorted_ids, block_slot, n, hidden, intermediate,
        h_q.stride(0), h_scales.stride(0), w2.stride(0), w2.stride(1), w2_scales.stride(0), w2_scales.stride(1),
        out.stride(0), **options,
    )
    return out


if triton is not None:
    from .fused_moe import block_rows

    @triton.jit
    def _fp8_gate_up_kernel(
        x_ptr, xs_ptr, w13_ptr, ws_ptr, h_ptr, sorted_ids_ptr, block_slot_ptr, num_copies, hidden, intermediate,
        stride_xm, stride_xs, stride_w_slot, stride_w_row, stride_s_slot, stride_s_row, stride_hm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_M sorted rows of one slot x BLOCK_N intermediate columns (within one 128-row
        block of gate and of up). h[r, n] = silu(x[c] . gate[s, n]) * (x[c] . up[s, n]), c = sorted_ids[r]."""
        slot, offs_m, copies, real, offs_n, n_ok = block_rows(block_slot_ptr, sorted_ids_ptr, num_copies,
                                                              intermediate, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, GROUP_K)
        gate_rows = slot * stride_w_slot + offs_n[None, :].to(tl.int64) * stride_w_row
        up_rows = gate_rows + intermediate * stride_w_row
        # BLOCK_N divides 128: every column of the tile shares one gate block row and one up block row.
        gate_block = slot * stride_s_slot + (tl.program_id(1) * BLOCK_N // GROUP_K) * stride_s_row
        up_block = gate_block + (intermediate // GROUP_K) * stride_s_row
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, tl.cdiv(hidden, GROUP_K)):
            k = g * GROUP_K + offs_k
            k_ok = k < hidden
            a = tl.load(x_ptr + copies[:, None] * stride_xm + k[None, :], mask=real[:, None] & k_ok[None, :],
                        other=0.0)
            wg = tl.load(w13_ptr + gate_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(w13_ptr + up_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            a_scale = tl.load(xs_ptr + copies * stride_xs + g, mask=real, other=0.0)[:, None]
            g_scale = tl.load(ws_ptr + gate_block + g, mask=slot >= 0, other=0.0)
            u_scale = tl.load(ws_ptr + up_block + g, mask=slot >= 0, other=0.0)
            gate += tl.dot(a, wg, out_dtype=tl.float32) * (a_scale * g_scale)
            up += tl.dot(a, wu, out_dtype=tl.float32) * (a_scale * u_scale)
        h = gate * tl.sigmoid(gate) * up
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=real[:, None] & n_ok[None, :])

    @triton.jit
    def _fp8_down_kernel(
        h_ptr, hs_ptr, w2_ptr, ws_ptr, out_ptr, sorted_ids_ptr, block_slot_ptr, num_copies, hidden, intermediate,
        stride_hm, stride_hs, stride_w_slot, stride_w_row, stride_s_slot, stride_s_row, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_M sorted rows of one slot x BLOCK_N hidden columns, scattered back to copy order."""
        slot, offs_m, copies, real, offs_n, n_ok = block_rows(block_slot_ptr, sorted_ids_ptr, num_copies, hidden,
                                                              BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, GROUP_K)
        rows = slot * stride_w_slot + offs_n[None, :].to(tl.int64) * stride_w_row
        block = slot * stride_s_slot + (tl.program_id(1) * BLOCK_N // GROUP_K) * stride_s_row
        h_rows = offs_m[:, None].to(tl.int64) * stride_hm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, tl.cdiv(intermediate, GROUP_K)):
            k = g * GROUP_K + offs_k
            k_ok = k < intermediate
            a = tl.load(h_ptr + h_rows + k[None, :], mask=real[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w2_ptr + rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            a_scale = tl.load(hs_ptr + offs_m.to(tl.int64) * stride_hs + g, mask=real, other=0.0)[:, None]
            w_scale = tl.load(ws_ptr + block + g, mask=slot >= 0, other=0.0)
            acc += tl.dot(a, w, out_dtype=tl.float32) * (a_scale * w_scale)
        out_ptrs = out_ptr + copies[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & n_ok[None, :])
