"""Multi-head latent attention (MLA): a naive path for prefill and a weight-absorbed path for decode."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .batch import AttentionGroup, ForwardBatch, table_slots
from .config import ModelConfig
from .kernels import KernelPath
from .layers import RMSNorm, linear
from .mla_decode import default_num_splits, paged_mla_decode
from .rope import RotaryEmbedding

AttentionPath = Literal["auto", "naive", "absorbed"]


class MLAttention(nn.Module):
    """Attention whose cache holds, per token, only `kv_lora_rank + qk_rope_head_dim` values.

    Both paths write the new tokens' latents into the cache, then attend over each sequence's context
    read back from it; they differ only in where the up-projection `kv_b_proj` is applied. `auto` expands
    for prompt chunks (compute-bound) and absorbs for decodes (memory-bound). With `kernels = "triton"`
    absorbed decodes run the paged kernel over the block tables.
    """

    kernels: KernelPath = "torch"

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.softmax_scale = c.softmax_scale
        q_out = self.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = linear(c.hidden_size, q_out, dtype, device)
        else:
            self.q_a_proj = linear(c.hidden_size, c.q_lora_rank, dtype, device, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype, device)
            self.q_b_proj = linear(c.q_lora_rank, q_out, dtype, device)
        self.kv_a_proj_with_mqa = linear(c.hidden_size, c.latent_dim, dtype, device, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, dtype, device)
        self.kv_b_proj = linear(c.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), dtype, device)
        self.o_proj = linear(self.num_heads * self.v_dim, c.hidden_size, dtype, device, bias=c.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cache: torch.Tensor,
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        path: AttentionPath = "auto",
    ) -> torch.Tensor:
        """x [T, hidden], cache [num_slots, latent_dim] (written in place) -> [T, hidden]"""
        q = self._queries(x).view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = rope.apply(q_pe, *cos_sin)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c_kv), rope.apply(k_pe, *cos_sin)), dim=-1)
        cache[batch.slot_mapping] = latent.to(cache.dtype)

        if batch.decode is not None and batch.prefill is None:  # a decode-only step: every token a decode row
            out = self._decode(q_nope, q_pe, cache, batch, path)
        else:
            out = x.new_empty(x.shape[0], self.num_heads, self.v_dim)
            if batch.decode is not None:
                rows = batch.decode.rows
                out[rows] = self._decode(q_nope[rows], q_pe[rows], cache, batch, path)
            if batch.prefill is not None:
                out[batch.prefill.token_rows] = self._attend(batch.prefill, q_nope, q_pe, cache, path)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))

    def _decode(self, q_nope, q_pe, cache, batch: ForwardBatch, path: AttentionPath) -> torch.Tensor:
        """The decodes' single-token queries [D, H, d] -> [D, H, v_dim].

        The kernel path reads each context through its block table; the torch path (the reference) gathers
        every slot of the table into a padded copy and masks beyond the context length. Neither waits on
        the host, so a CUDA graph can capture either.
        """
        if path == "naive" or self.kernels == "torch":
            length = batch.block_tables.shape[1] * batch.block_size
            slots = table_slots(batch.decode.of(batch.block_tables), batch.block_size)
            context = cache[slots].to(q_nope.dtype)  # [D, Lk, latent_dim]
            keys = torch.arange(length, device=context.device)
            lengths = batch.decode.context_lens(batch.context_lens)
            mask = (keys[None, :] < lengths[:, None])[:, None, None, :]  # [D, 1, 1, Lk]
            attend = self._naive if path == "naive" else self._absorbed
            return attend(q_nope[:, None], q_pe[:, None], context, mask)[:, 0]
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("dhn,hnc->dhc", q_nope, w_uk)
        q = torch.cat((q_latent, q_pe), dim=-1).to(cache.dtype)
        # Splits from the batch size alone (not the table's width): a graph's padded, full-width tables and
        # an eager step's narrow ones then split alike, and the graph computes what the eager step does.
        splits = default_num_splits(q.shape[0], self.num_heads)
        out_latent = paged_mla_decode(q, cache, batch.decode.of(batch.block_tables),
                                      batch.decode.context_lens(batch.context_lens), batch.block_size,
                                      self.kv_lora_rank, self.softmax_scale, splits)
        return torch.einsum("dhc,hvc->dhv", out_latent.to(q_nope.dtype), w_uv)

    def _attend(self, group: AttentionGroup, q_nope, q_pe, cache, path: AttentionPath) -> torch.Tensor:
        """The prompt chunks' attention -> [Tg, H, v_dim] for their tokens, in `group.token_rows` order."""
        context = cache[group.context_slots].to(q_nope.dtype)  # [G, Lk, latent_dim]
        q_nope, q_pe = q_nope[group.query_index], q_pe[group.query_index]  # [G, Lq, H, d]
        # Prompt chunks are compute-bound: expand the latents once to per-head keys and values.
        attend = self._absorbed if path == "absorbed" else self._naive
        # Without a cached prefix every query i of a member sees keys 0..i, all its own (a shorter member's
        # padding lies beyond its queries): causal attention with no mask tensor.
        mask = None if group.from_start else group.attention_mask()
        return attend(q_nope, q_pe, context, mask)[group.query_valid]

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [H, nope, C] and W_UV [H, v, C]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _naive(self, q_nope, q_pe, context, mask) -> torch.Tensor:
        """Expand the context's latents into per-head keys and values, then ordinary attention."""
        b, lk, _ = context.shape
        c_kv, k_pe = context.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, lk, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, context, mask) -> torch.Tensor:
        """Fold W_UK into the query and W_UV after the attention: attend directly over the latents."""
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bqhd,hdc->bhqc", q_nope, w_uk)
        q = torch.cat((q_latent, q_pe.transpose(1, 2)), dim=-1)  # [B, H, Lq, C + R]
        k = context[:, None]  # one latent "head" shared by all query heads
        v = context[:, None, :, : self.kv_lora_rank]
        heads = q.shape[1]
        out_latent = F.scaled_dot_product_attention(
            q, k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1), attn_mask=mask, is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return torch.einsum("bhqc,hvc->bqhv", out_latent, w_uv)
