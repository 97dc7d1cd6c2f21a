"""Whether a deployment's ranks can hold their weights: warnings `r1serve spec validate --checkpoint` prints.

It reads the checkpoint's config.json only (not the weights), so it runs where the spec is written. It needs
the model's packages (torch), so it sits beside the command line, outside the spec, which the operator imports.
"""

from __future__ import annotations

from pathlib import Path

from r1serve.runtime.model.checkpoint import is_fp8_checkpoint
from r1serve.runtime.model.config import ModelConfig
from r1serve.runtime.model.memory import GIB, format_weight_bytes, weight_bytes_per_rank
from r1serve.spec import R1Deployment

DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float64": 8}


def weight_warnings(deployment: R1Deployment, checkpoint: str | Path, gpu_memory_gib: float,
                    max_share: float) -> list[str]:
    """One warning per GPU pool whose ranks' weights alone exceed `max_share` of their GPUs' memory. auto is
    counted as it resolves on GPUs: bfloat16, and FP8 weights kept for an FP8 checkpoint (the warning says so,
    since a GPU without FP8 tensor cores would load them dequantized)."""
    if gpu_memory_gib <= 0:
        raise ValueError(f"--gpu-memory-gib: must be positive (got {gpu_memory_gib:g})")
    if not 0 < max_share <= 1:
        raise ValueError(f"--max-weight-share: must be in (0, 1] (got {max_share:g})")
    config = ModelConfig.from_file(checkpoint)
    fp8_checkpoint = is_fp8_checkpoint(checkpoint)
    spec = deployment.spec
    if spec.speculative is not None and config.num_nextn_predict_layers < 1:
        raise ValueError("spec.speculative: the checkpoint has no MTP layer to draft with "
                         "(config.json: num_nextn_predict_layers is 0); remove spec.speculative")
    warnings = []
    for role, pool in spec.active_pools().items():
        if not pool.gpus_per_rank:
            continue
        dtype = "bfloat16" if spec.model.dtype == "auto" else spec.model.dtype
        weights = spec.model.weights
        if weights == "auto":
            weights = "fp8" if fp8_checkpoint else "dequantized"
        if (config.n_routed_experts + spec.experts.redundant) % pool.expert_parallel:
            raise ValueError(f"spec.{role}.expertParallel: the checkpoint's {config.n_routed_experts} routed experts "
                             f"+ experts.redundant {spec.experts.redundant} do not divide over "
                             f"{pool.expert_parallel} ranks")
        plan = weight_bytes_per_rank(config, weights=weights, dtype_bytes=DTYPE_BYTES[dtype],
                                     expert_parallel=pool.expert_parallel, redundant=spec.experts.redundant,
                                     mtp=spec.speculative is not None)
        budget = max_share * gpu_memory_gib * GIB * pool.gpus_per_rank
        if plan.total > budget:
            auto_fp8 = spec.model.weights == "auto" and weights == "fp8"
            counted = " (model.weights auto counted as fp8)" if auto_fp8 else ""
            warnings.append(
                f"spec.{role}: weights alone take {format_weight_bytes(plan)} with model.weights {weights} in "
                f"{dtype}{counted}: more than {max_share:.0%} of {pool.gpus_per_rank} x {gpu_memory_gib:g} GiB "
                f"(--gpu-memory-gib, --max-weight-share); raise spec.{role}.expertParallel or use fp8 weights")
    return warnings
