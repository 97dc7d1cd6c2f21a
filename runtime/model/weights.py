"""The published checkpoint's tensor names and shapes, derived from the config alone."""

from __future__ import annotations

import re

from .config import ModelConfig

Shape = tuple[int, ...]

_EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def expert_of(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, projection) for a routed expert's tensor name, else None."""
    m = _EXPERT_NAME.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def layer_of(name: str) -> int | None:
    m = _LAYER_NAME.match(name)
    return int(m.group(1)) if m else None


def checkpoint_shapes(config: ModelConfig, *, include_mtp: bool = False) -> dict[str, Shape]:
    """Every tensor of the published layout (bf16 form: no FP8 scales), in checkpoint order."""
    c = config
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    layers = c.num_hidden_layers + (c.num_nextn_predict_layers if include_mtp else 0)
    for layer in range(layers):
        shapes.update(_layer_shapes(c, layer))
        if layer >= c.num_hidden_layers:
            shapes.update(_mtp_extra_shapes(c, layer))
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def _layer_shapes(c: ModelConfig, layer: int) -> dict[str, Shape]:
    p = f"model.layers.{layer}."
    h, heads = c.hidden_size, c.num_attention_heads
    s: dict[str, Shape] = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    a = p + "self_attn."
    if c.q_lora_rank is None:
        s[a + "q_proj.weight"] = (heads * c.qk_head_dim, h)
    else:
        s[a + "q_a_proj.weight"] = (c.q_lora_rank, h)
        s[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
        s[a + "q_b_proj.weight"] = (heads * c.qk_head_dim, c.q_lora_rank)
    s[a + "kv_a_proj_with_mqa.weight"] = (c.latent_dim, h)
    s[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
    s[a + "kv_b_proj.weight"] = (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    s[a + "o_proj.weight"] = (h, heads * c.v_head_dim)
    if c.attention_bias:
        s.update({a + "q_a_proj.bias": (c.q_lora_rank,)} if c.q_lora_rank else {})
        s[a + "kv_a_proj_with_mqa.bias"] = (c.latent_dim,)
        s[a + "o_proj.bias"] = (h,)
    m = p + "mlp."
    if not c.is_moe_layer(layer):
        s.update(_mlp_shapes(m, h, c.intermediate_size))
        return s
    s[m + "gate.weight"] = (c.n_routed_experts, h)
    s[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
    for e in range(c.n_routed_experts):
        s.update(_mlp_shapes(f"{m}experts.{e}.", h, c.moe_intermediate_size))
    if c.n_shared_experts:
        s.update(_mlp_shapes(m + "shared_experts.", h, c.moe_intermediate_size * c.n_shared_experts))
    return s


def _mlp_shapes(prefix: str, hidden: int, intermediate: int) -> dict[str, Shape]:
    return {
        prefix + "gate_proj.weight": (intermediate, hidden),
        prefix + "up_proj.weight": (intermediate, hidden),
        prefix + "down_proj.weight": (hidden, intermediate),
    }


def _mtp_extra_shapes(c: ModelConfig, layer: int) -> dict[str, Shape]:
    """DeepSeek-V3's multi-token-prediction module adds these beside an ordinary decoder layer."""
    p, h = f"model.layers.{layer}.", c.hidden_size
    return {
        p + "embed_tokens.weight": (c.vocab_size, h),
        p + "enorm.weight": (h,),
        p + "hnorm.weight": (h,),
        p + "eh_proj.weight": (h, 2 * h),
        p + "shared_head.norm.weight": (h,),
        p + "shared_head.head.weight": (c.vocab_size, h),
    }
