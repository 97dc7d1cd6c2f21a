"""Paged MLA decode attention in Triton (flash-decoding): one query token per sequence over its paged latents.

A fast twin of `MLAttention._absorbed` for decode steps: with W_UK folded into the query, every head attends
over the same latent rows, keys being the whole cached row (latent C, then rope R) and values its first C
columns. The kernel reads each context row once per block of BLOCK_H heads, through the block table, and
never materialises a padded context.

Each (token, head block) splits its context into `num_splits` contiguous ranges handled by separate
programs (flash-decoding), so that a few long sequences still fill the GPU; a second kernel merges the
partial outputs by their log-sum-exps. Launch sizes depend only on shapes and Python ints, never on
tensor values, so the call can be captured in a CUDA graph.

Triton is optional: this module imports without it and `paged_mla_decode` raises when it is missing.
`paged_mla_decode_torch` is the reference. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors.
"""

from __future__ import annotations

import torch

from r1serve.runtime.model.kernels import dot_options

try:
    import triton
    import triton.language as tl
except ImportError:  # the serving install: the torch path is used
    triton = None

HAVE_TRITON = triton is not None

# 16 heads per program: the smallest M a tensor-core dot accepts, and all query heads share the rows read.
BLOCK_H = 16
# Context tokens per tile. With C = 512 a bf16 tile is 32 KiB of shared memory; 64 would double it per
# pipeline stage.
BLOCK_N = 32
NUM_WARPS = 4
NUM_STAGES = 2

# The default split count: enough programs to fill an H100/H200 (132 SMs) about twice, no split shorter
# than MIN_SPLIT_TOKENS (each split pays its query load and a merge), and at most MAX_SPLITS, which also
# bounds the float32 partial outputs, D x H x splits x C.
TARGET_PROGRAMS = 264
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 16

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_num_splits(num_tokens: int, num_heads: int, max_context: int | None = None) -> int:
    """Splits per (token, head block) for a batch of num_tokens tokens whose block tables hold max_context
    (None: by occupancy alone; each split then covers its share of each token's own context)."""
    programs = max(1, num_tokens * -(-num_heads // BLOCK_H))
    by_occupancy = -(-TARGET_PROGRAMS // programs)
    by_length = MAX_SPLITS if max_context is None else -(-max_context // MIN_SPLIT_TOKENS)
    return max(1, min(MAX_SPLITS, by_occupancy, by_length))


def _check(q, cache, block_tables, context_lens, block_size, kv_lora_rank) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [D, H, C + R], got shape {tuple(q.shape)}")
    if cache.dim() != 2 or cache.shape[1] != q.shape[2]:
        raise ValueError(f"cache must be [num_slots, {q.shape[2]}] to match q, got shape {tuple(cache.shape)}")
    if q.dtype not in _DTYPES or cache.dtype != q.dtype:
        raise ValueError(f"q and cache must share one of float32, bfloat16, float16, got {q.dtype} and {cache.dtype}")
    if not 0 < kv_lora_rank <= q.shape[2]:
        raise ValueError(f"kv_lora_rank must be in [1, {q.shape[2]}] (q's last dim), got {kv_lora_rank}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [{q.shape[0]}, max_blocks] int32, got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype}")
    if context_lens.shape != (q.shape[0],) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be [{q.shape[0]}] int32, got {tuple(context_lens.shape)} "
                         f"{context_lens.dtype}")
    for name, tensor in (("cache", cache), ("block_tables", block_tables), ("context_lens", context_lens)):
        if tensor.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")


def paged_mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     block_size: int, kv_lora_rank: int, softmax_scale: float,
                     num_splits: int | None = None) -> torch.Tensor:
    """q [D, H, C + R], cache [slots, C + R], block_tables [D, max_blocks], context_lens [D] -> [D, H, C].

    out[d, h] = softmax(scale * q[d, h] . k) . v over token d's positions 0 .. context_lens[d] - 1, where
    position p lives in cache row block_tables[d, p // block_size] * block_size + p % block_size, k is the
    row and v its first C = kv_lora_rank columns. Accumulated in float32 and returned in q's dtype; a
    context of 0 gives zeros. Contexts are clamped to the block table's max_blocks * block_size.
    """
    if not HAVE_TRITON:
        raise RuntimeError("paged_mla_decode needs triton, which is not installed; use paged_mla_decode_torch")
    _check(q, cache, block_tables, context_lens, block_size, kv_lora_rank)
    num_tokens, num_heads, width = q.shape
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = default_num_splits(num_tokens, num_heads, max_context)
    if num_splits < 1:
        raise ValueError(f"num_splits must be positive, got {num_splits}")
    out = torch.empty(num_tokens, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_heads == 0:
        return out
    # One split writes its normalised output straight into out; several write float32 partials to merge.
    partial = out[:, :, None] if num_splits == 1 else torch.empty(
        num_tokens, num_heads, num_splits, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
    rope = width - kv_lora_rank
    block_c = max(16, triton.next_power_of_2(kv_lora_rank))
    block_r = max(16, triton.next_power_of_2(rope))
    # The kernel's softmax uses exp2: fold log2(e) into the scale, and the log-sum-exps are base 2.
    qk_scale = softmax_scale * 1.4426950408889634
    _decode_kernel[(num_tokens, triton.cdiv(num_heads, BLOCK_H), num_splits)](
        q, cache, block_tables, context_lens, partial, lse,
        num_heads, kv_lora_rank, rope, max_context, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), cache.stride(0), cache.stride(1), block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        BLOCK_C=block_c, BLOCK_R=block_r, **dot_options(q.dtype),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if num_splits > 1:
        _merge_kernel[(num_tokens, num_heads)](
            partial, lse, out, kv_lora_rank,
            partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1), out.stride(2),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_C=block_c,
        )
    return out


def paged_mla_decode_torch(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, kv_lora_rank: int,
                           softmax_scale: float) -> torch.Tensor:
    """The reference for `paged_mla_decode` (same contract): gathers every context, attends in float32."""
    _check(q, cache, block_tables, context_lens, block_size, kv_lora_rank)
    positions = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    valid = positions[None, :] < context_lens[:, None].long()  # [D, P]
    slots = block_tables.long()[:, positions // block_size] * block_size + positions % block_size
    # Table entries past a context are arbitrary and rows past it unwritten: neither is read nor used.
    keys = torch.where(valid[..., None], cache[torch.where(valid, slots, 0)].float(), 0.0)  # [D, P, C + R]
    scores = torch.einsum("dhk,dpk->dhp", q.float(), keys) * softmax_scale
    probs = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1)
    probs = torch.where(valid[:, None], probs, 0.0)  # an empty context's row is all NaN before this
    return torch.einsum("dhp,dpc->dhc", probs, keys[..., :kv_lora_rank]).to(q.dtype)


if HAVE_TRITON:

    @triton.jit
    def _decode_kernel(
        q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, partial_ptr, lse_ptr,
        num_heads, latent, rope, max_context, qk_scale,
        stride_qd, stride_qh, stride_qk, stride_cs, stride_ck, stride_bt,
        stride_pd, stride_ph, stride_ps, stride_pc, stride_ld, stride_lh, stride_ls,
        BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program: token d, heads [hb * BLOCK_H, +BLOCK_H), split s of d's context.

        Writes the split's softmax-normalised output and its base-2 log-sum-exp (-inf for an empty split).
        """
        d = tl.program_id(0)
        hb = tl.program_id(1)
        split = tl.program_id(2)
        context = tl.minimum(tl.load(context_lens_ptr + d), max_context)
        # Splits cover whole tiles, so only a context's last tile is partial.
        tiles_per_split = tl.cdiv(tl.cdiv(context, BLOCK_N), NUM_SPLITS)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, context)

        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < num_heads
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < latent
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rope
        # Latent and rope parts are separate tiles, so that C + R = 576 pads to 512 + 64, not 1024.
        q_rows = q_ptr + d.to(tl.int64) * stride_qd + offs_h[:, None] * stride_qh
        q_c = tl.load(q_rows + offs_c[None, :] * stride_qk, mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        q_r = tl.load(q_rows + (latent + offs_r[None, :]) * stride_qk, mask=h_ok[:, None] & r_ok[None, :],
                      other=0.0)
        if UPCAST:
            q_c = q_c.to(tl.float32)
            q_r = q_r.to(tl.float32)

        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        table = block_tables_ptr + d.to(tl.int64) * stride_bt
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            # A tile may span several cache blocks (block_size < BLOCK_N): each token finds its own row.
            block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0)
            # int64: slot * row stride exceeds 2**31 elements in a large cache.
            rows = cache_ptr + (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * stride_cs
            k_c = tl.load(rows[:, None] + offs_c[None, :] * stride_ck, mask=valid[:, None] & c_ok[None, :],
                          other=0.0)
            k_r = tl.load(rows[:, None] + (latent + offs_r[None, :]) * stride_ck,
                          mask=valid[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                k_c = k_c.to(tl.float32)
                k_r = k_r.to(tl.float32)
            scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
            scores = tl.dot(q_r, tl.trans(k_r), scores, input_precision=DOT_PRECISION)
            scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
            # Every tile holds a valid position, so m_new is finite and exp2(-inf - m_new) is a clean 0.
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            # The probabilities are rounded to the cache's dtype for a native tensor-core dot, as a bf16
            # flash attention does; under the interpreter the bf16 rounding is kept, then upcast.
            p = p.to(cache_ptr.dtype.element_ty)
            if UPCAST:
                p = p.to(tl.float32)
            acc = tl.dot(p, k_c, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m = m_new

        # An empty split has denom = 0 and acc = 0: it stores zeros and lse = -inf, which the merge weighs 0.
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        p_rows = partial_ptr + d.to(tl.int64) * stride_pd + split * stride_ps + offs_h[:, None] * stride_ph
        tl.store(p_rows + offs_c[None, :] * stride_pc, out.to(partial_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & c_ok[None, :])
        lse = tl.where(denom > 0, m + tl.log2(tl.where(denom > 0, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + d.to(tl.int64) * stride_ld + offs_h * stride_lh + split * stride_ls, lse, mask=h_ok)

    @triton.jit
    def _merge_kernel(
        partial_ptr, lse_ptr, out_ptr, latent,
        stride_pd, stride_ph, stride_ps, stride_pc, stride_ld, stride_lh, stride_ls, stride_od, stride_oh, stride_oc,
        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program: token d, head h; out = sum_s 2^lse_s partial_s / sum_s 2^lse_s."""
        d = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < latent
        lse = tl.load(lse_ptr + d * stride_ld + h * stride_lh + offs_s * stride_ls, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        # All splits empty (a context of 0): weigh them all 0 rather than exp2(-inf - -inf) = NaN.
        weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        total = tl.sum(weights, 0)
        rows = partial_ptr + d * stride_pd + h * stride_ph + offs_s[:, None] * stride_ps + offs_c[None, :] * stride_pc
        partial = tl.load(rows, mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        out = tl.sum(partial * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + d * stride_od + h * stride_oh + offs_c * stride_oc, out.to(out_ptr.dtype.element_ty),
                 mask=c_ok)
