"""The fused MoE Triton kernels: grouped gate/up + SiLU-and-multiply, then grouped down, over routed token copies.

A fast twin of `RoutedExperts.forward` (the torch path stays the CPU path and the reference): same
contract, x [N, hidden] token copies and slots [N] -> [N, hidden] unweighted expert outputs. Unlike the
torch path's padded `bmm`, which reads every expert slot, the kernels read only the weights of slots
that received tokens.

Triton is optional: the product's install does not bring it, so this module imports without it and
`fused_experts` raises when it is missing. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors
(the tests do that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1serve.runtime.model.kernels import dot_options

try:
    import triton
    import triton.language as tl
except ImportError:  # the serving install: the torch path is used
    triton = None

HAVE_TRITON = triton is not None

@dataclass(frozen=True)
class Tiles:
    """One launch's tile sizes. block_m is also the alignment unit: each slot's copies are padded to a
    multiple of it, so every block of block_m sorted rows belongs to one slot and reads one expert."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Decode-sized batches give each expert a few copies: the kernels stream weights, so the row block is the
# smallest a tensor-core dot accepts (16) and padding stays small. Prefill-sized batches give each expert
# hundreds: bigger blocks reuse every weight tile across more rows (each block of rows re-reads the
# expert's weights). Shared memory per stage: block_k * (block_m + 2 * block_n) * element size, within
# Hopper's 227 KiB at these stage counts in bf16 and float32.
DECODE_TILES = Tiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
MIDDLE_TILES = Tiles(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)
PREFILL_TILES = Tiles(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=2)
ALL_TILES = (DECODE_TILES, MIDDLE_TILES, PREFILL_TILES)


def tiles_for(num_copies: int, num_slots: int) -> Tiles:
    """The tiles for N copies over S slots; depends only on N and S, so a captured graph keeps its choice."""
    per_slot = num_copies / max(num_slots, 1)
    if per_slot <= 16:
        return DECODE_TILES
    return MIDDLE_TILES if per_slot <= 64 else PREFILL_TILES


def align_to_blocks(slots: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [N] -> (sorted_ids [B * block_m] int32, block_slot [B] int32), B a bound on the row blocks.

    sorted_ids lists the copies grouped by slot (stable order within a slot), each group padded with the
    value N to a multiple of block_m; block_slot[b] is the slot whose weights block b multiplies. Slots
    without tokens get no block, so their weights are never read. B depends only on N and the number of
    slots, never on the routing, so nothing here waits for the device (CUDA graphs capture it); the
    blocks beyond those used have block_slot -1 and only padding rows, and the kernels skip them.
    """
    n = slots.numel()
    device = slots.device
    counts = torch.zeros(num_slots, dtype=torch.long, device=device).scatter_add_(0, slots, torch.ones_like(slots))
    blocks = (counts + block_m - 1) // block_m
    # Each slot that received copies pads at most block_m - 1 rows, and at most min(N, S) slots did.
    max_blocks = (n + (block_m - 1) * min(n, num_slots)) // block_m
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    first_copy = torch.cumsum(counts, 0) - counts  # where each slot's copies start, unpadded
    block_end = torch.cumsum(blocks, 0)
    first_row = (block_end - blocks) * block_m  # ... and padded
    position = first_row[sorted_slots] + torch.arange(n, device=device) - first_copy[sorted_slots]
    sorted_ids = torch.full((max_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_ids[position] = order.to(torch.int32)
    block_slot = torch.searchsorted(block_end, torch.arange(max_blocks, device=device), right=True)
    block_slot = torch.where(block_slot < num_slots, block_slot, -1).to(torch.int32)
    return sorted_ids, block_slot


def fused_experts(x: torch.Tensor, slots: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  intermediate: int | None = None) -> torch.Tensor:
    """x [N, hidden], slots [N] in [0, S), w13 [S, 2*I, hidden], w2 [S, hidden, I] -> [N, hidden] (x's dtype).

    out[j] = w2[s] @ (silu(w13[s, :I] @ x[j]) * (w13[s, I:] @ x[j])) with s = slots[j], accumulated in
    float32; the intermediate activation is rounded once to x's dtype, where the torch path rounds gate,
    up and their product.
    """
    if not HAVE_TRITON:
        raise RuntimeError("fused_experts needs triton, which is not installed; use the torch path")
    n, hidden = x.shape
    num_slots = w13.shape[0]
    intermediate = w2.shape[2] if intermediate is None else intermediate
    if w13.shape != (num_slots, 2 * intermediate, hidden) or w2.shape != (num_slots, hidden, intermediate):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match hidden={hidden}, "
                         f"intermediate={intermediate}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x, w13 and w2 must share one dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    out = torch.empty_like(x)
    if n == 0:
        return out
    tiles = tiles_for(n, num_slots)
    sorted_ids, block_slot = align_to_blocks(slots, num_slots, tiles.block_m)
    num_blocks = block_slot.numel()
    # The activation stays in sorted, padded row order: each down block then reads block_m contiguous rows,
    # and only the down kernel scatters back to copy order.
    h = torch.empty(sorted_ids.numel(), intermediate, dtype=x.dtype, device=x.device)
    options = {**dot_options(x.dtype), "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
               "BLOCK_K": tiles.block_k, "num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    _gate_up_kernel[(num_blocks, triton.cdiv(intermediate, tiles.block_n))](
        x, w13, h, sorted_ids, block_slot, n, hidden, intermediate,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0), h.stride(1), **options,
    )
    _down_kernel[(num_blocks, triton.cdiv(hidden, tiles.block_n))](
        h, w2, out, sorted_ids, block_slot, n, hidden, intermediate,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0), out.stride(1), **options,
    )
    return out


if HAVE_TRITON:

    @triton.jit
    def block_rows(block_slot_ptr, sorted_ids_ptr, num_copies, columns, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """Where one program of an expert kernel works (every expert kernel here and in fp8_moe.py): its slot
        (-1: a spare block), its padded sorted rows, the copies they hold and which are real, and its columns
        of `columns` with those in range. A spare block's columns are all out of range: it loads no weights
        (masked loads read no memory)."""
        # int64: slot * stride exceeds 2**31 at DeepSeek-V3's sizes (256 slots x 2*2048 x 7168).
        slot = tl.load(block_slot_ptr + tl.program_id(0)).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        copies = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        real = copies < num_copies  # padding rows hold num_copies and read zeros
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < tl.where(slot >= 0, columns, 0)
        return slot, offs_m, copies, real, offs_n, n_ok

    @triton.jit
    def _gate_up_kernel(
        x_ptr, w13_ptr, h_ptr, sorted_ids_ptr, block_slot_ptr, num_copies, hidden, intermediate,
        stride_xm, stride_xk, stride_ws, stride_wn, stride_wk, stride_hm, stride_hn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_M sorted rows of one slot x BLOCK_N intermediate columns.

        h[r, n] = silu(x[c] . w13[s, n]) * (x[c] . w13[s, I + n]), r a padded sorted row, c = sorted_ids[r].
        """
        slot, offs_m, copies, real, offs_n, n_ok = block_rows(block_slot_ptr, sorted_ids_ptr, num_copies,
                                                              intermediate, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + copies[:, None] * stride_xm + offs_k[None, :] * stride_xk
        # The weight tile is read transposed ([BLOCK_K, BLOCK_N]) so the dot is x @ w.T without a copy.
        gate_ptrs = w13_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        up_ptrs = gate_ptrs + intermediate * stride_wn
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = offs_k < hidden - k0
            a = tl.load(x_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(gate_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            gate = tl.dot(a, wg, gate, input_precision=DOT_PRECISION)
            up = tl.dot(a, wu, up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            gate_ptrs += BLOCK_K * stride_wk
            up_ptrs += BLOCK_K * stride_wk
        h = gate * tl.sigmoid(gate) * up
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hn
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr, w2_ptr, out_ptr, sorted_ids_ptr, block_slot_ptr, num_copies, hidden, intermediate,
        stride_hm, stride_hk, stride_ws, stride_wn, stride_wk, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_M sorted rows of one slot x BLOCK_N hidden columns, scattered back to copy order.

        out[c, n] = h[r] . w2[s, n], c = sorted_ids[r]; padding rows are computed and not stored.
        """
        slot, offs_m, copies, real, offs_n, n_ok = block_rows(block_slot_ptr, sorted_ids_ptr, num_copies, hidden,
                                                              BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :] * stride_hk
        w_ptrs = w2_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, intermediate, BLOCK_K):
            k_ok = offs_k < intermediate - k0
            a = tl.load(h_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)  # spare blocks: unwritten
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        out_ptrs = out_ptr + copies[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & n_ok[None, :])
