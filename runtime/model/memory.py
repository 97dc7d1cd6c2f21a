"""Weight bytes one expert-parallel rank holds, from the config alone: what to plan GPUs with before loading."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .fp8 import DEFAULT_BLOCK, kept_fp8, scale_shape
from .weights import checkpoint_shapes, expert_of

GIB = 1 << 30
# The router's weight and bias stay float32 whatever the dtype: routing runs in float32 (moe.TopKGate).
ROUTER_FLOAT32 = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")


@dataclass(frozen=True)
class WeightBytes:
    """Per rank: the routed experts in its slots, and every weight each rank holds whole (attention is
    data-parallel, so attention, dense and shared MLPs, embeddings, lm_head, norms and routers are replicated)."""

    routed_experts: int
    replicated: int
    # Speculative decoding's MTP layer (dequantized): its share of routed experts, as a MoE layer's, and the rest
    # whole.
    mtp_layer: int = 0

    @property
    def total(self) -> int:
        return self.routed_experts + self.replicated + self.mtp_layer


def weight_bytes_per_rank(config: ModelConfig, *, weights: str, dtype_bytes: int, expert_parallel: int = 1,
                          redundant: int = 0, mtp: bool = False) -> WeightBytes:
    """`weights` fp8: the projections the model keeps FP8 (fp8.kept_fp8, routed experts included) take one byte
    per value plus a float32 multiplier per 128x128 block; the router four bytes per value; everything else
    `dtype_bytes` per value. `mtp`: the MTP layer drafts (spec.speculative), in `dtype_bytes`, its routed experts
    placed as a MoE layer's."""
    if weights not in ("fp8", "dequantized"):
        raise ValueError(f"weights: must be fp8 or dequantized here (got {weights!r}); resolve auto first")
    if expert_parallel <= 0 or (config.n_routed_experts + redundant) % expert_parallel:
        raise ValueError(f"expert_parallel: {config.n_routed_experts} experts + {redundant} redundant do not divide "
                         f"over {expert_parallel} ranks")
    experts = replicated = 0
    for name, shape in checkpoint_shapes(config).items():
        values = math.prod(shape)
        if name.endswith(ROUTER_FLOAT32):
            size = values * 4
        elif weights == "fp8" and kept_fp8(name):
            size = values + 4 * math.prod(scale_shape(shape, DEFAULT_BLOCK))
        else:
            size = values * dtype_bytes
        if expert_of(name) is not None:
            experts += size
        else:
            replicated += size
    slots = (config.n_routed_experts + redundant) // expert_parallel
    mtp_layer = 0
    if mtp:
        main = checkpoint_shapes(config)
        for name, shape in checkpoint_shapes(config, include_mtp=True).items():
            if name in main:
                continue
            size = math.prod(shape) * (4 if name.endswith(ROUTER_FLOAT32) else dtype_bytes)
            mtp_layer += size * slots // config.n_routed_experts if expert_of(name) is not None else size
    return WeightBytes(routed_experts=experts * slots // config.n_routed_experts, replicated=replicated,
                       mtp_layer=mtp_layer)


def format_weight_bytes(plan: WeightBytes) -> str:
    mtp = f", MTP layer {plan.mtp_layer / GIB:.2f} GiB" if plan.mtp_layer else ""
    return (f"{plan.total / GIB:.2f} GiB per rank (routed experts {plan.routed_experts / GIB:.2f} GiB, "
            f"replicated weights {plan.replicated / GIB:.2f} GiB{mtp})")
