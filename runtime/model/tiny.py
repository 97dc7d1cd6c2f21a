"""Tiny random DeepSeek-V3 checkpoints in the published layout, for demos and tests without downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig
from .weights import checkpoint_shapes

# Real vocabulary and special tokens, tiny everything else: 1 dense layer then 2 MoE layers with
# grouped routing, low-rank queries, YaRN, and one multi-token-prediction layer like the real model.
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
}

# Output-head scale: with unit-RMS final hidden states this gives logits with a standard deviation of
# about 1.5 * sqrt(hidden), so each next-token distribution has a clear winner rather than near-ties.
HEAD_STD = 1.5


def tiny_config(overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    data = dict(TINY_CONFIG)
    data.update(overrides or {})
    return ModelConfig.from_dict(data)


def random_weights(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor of the published layout (MTP layer included), initialised so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in checkpoint_shapes(config, include_mtp=True).items():
        tensors[name] = _init(name, shape, gen).to(dtype)
    return tensors


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * noise  # steers expert choice a little, as trained biases do
    if len(shape) == 1:
        return 1.0 + 0.1 * noise  # norm weights
    if name.endswith("embed_tokens.weight"):
        return noise
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        return HEAD_STD * noise
    if name.endswith("mlp.gate.weight"):
        return 2.0 * noise / shape[-1] ** 0.5  # routing scores spread well apart
    return noise / shape[-1] ** 0.5


def make_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    fp8: bool = False,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 16 * 2**20,
) -> Path:
    """Write a random tiny checkpoint with the real tokenizer; returns its folder."""
    from .checkpoint_writer import save_checkpoint

    config = tiny_config(overrides)
    tensors = random_weights(config, seed)
    return save_checkpoint(
        out_dir, tensors, config.to_dict(), fp8=fp8, max_shard_bytes=max_shard_bytes, overwrite=overwrite
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs from the command line; values are JSON (so `null`, numbers and objects work)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config override {item!r}: expected KEY=VALUE, e.g. q_lora_rank=null")
        if key not in TINY_CONFIG and key not in ("rope_interleave", "attention_bias"):
            raise ValueError(f"config override {item!r}: unknown config field {key!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"config override {item!r}: value is not JSON (try quotes or null)") from None
    return out
