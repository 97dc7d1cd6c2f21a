"""The one place a pool replica gets its engine: an in-process engine, an expert-parallel group, or the mock.

Which one is explicit: the plan's `expertParallel` picks one process or a group, and an EngineSource
(the application's `engine` argument) picks the model or the model-free MockEngine. The mock and the
faulty KV connector are product components for testing the serving layers without a model; the
replica never branches on them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from r1serve.runtime.engine.interface import EngineClient

from .connector import KV_FAULTS
from .pool_plan import PoolPlan


@dataclass(frozen=True)
class EngineSource:
    """What a pool replica's engine is: the model (the default), or the MockEngine with its delays; `kv_fault`
    makes every KV hand-off fail as a lost (`lost`) or late (`timeout`) one would, or holds it a while first
    (`held`: connector.HELD_S)."""

    kind: Literal["model", "mock"] = "model"
    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    kv_fault: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None, where: str = "args.engine") -> EngineSource:
        """Read from the application's arguments, where every field is optional."""
        values = dict(args or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        source = cls(**values)
        if source.kind not in ("model", "mock"):
            raise ValueError(f"{where}.kind: must be model or mock (got {source.kind!r})")
        if source.kv_fault is not None and source.kv_fault not in KV_FAULTS:
            raise ValueError(f"{where}.kv_fault: must be one of {', '.join(KV_FAULTS)} (got {source.kv_fault!r})")
        return source


MODEL = EngineSource()


def make_engine_client(plan: PoolPlan, checkpoint: Path, source: EngineSource = MODEL, *,
                       direct: str | None = None) -> EngineClient:
    """The engine of one pool replica: one EP group of expertParallel ranks, or the engine in this process.

    `direct`: the rank-to-rank connector (nixl, gloo, cuda-ipc) the replica hands off with, so its latents move between
    rank actors, never through this replica."""
    if source.kind == "mock":
        return _mock_engine(plan, source)
    if plan.engine.speculative_tokens:
        from r1serve.runtime.model.config import ModelConfig

        if ModelConfig.from_file(checkpoint).num_nextn_predict_layers < 1:
            raise ValueError("spec.speculative: the checkpoint has no MTP layer to draft with "
                             "(config.json: num_nextn_predict_layers is 0); remove spec.speculative")
    if plan.expert_parallel > 1 or plan.gpus_per_rank or direct:
        # The GPUs belong to the rank bundles, not to the replica actor (which reserves none): a GPU pool
        # runs its engine in rank actors even with one rank, so the device is the spec's.
        device = "cuda" if plan.gpus_per_rank else "cpu"
        return _expert_parallel_group(plan, checkpoint, device, torch_dtype(plan.dtype, device), direct)
    import torch

    device, dtype = "cpu", torch_dtype(plan.dtype, "cpu")
    # The replica actor reserves one CPU, but the model runs for the rank the spec sized.
    torch.set_num_threads(max(1, min(plan.cpu_threads, os.cpu_count() or 1)))

    from r1serve.runtime.engine.async_engine import AsyncEngine
    from r1serve.runtime.engine.engine import LLMEngine

    return AsyncEngine(LLMEngine.from_checkpoint(checkpoint, plan.engine, dtype=dtype, device=device,
                                                 weights=plan.weights))


def torch_dtype(name: str, device: str):
    """spec.model.dtype on `device`: auto is bfloat16 on GPUs, float32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _expert_parallel_group(plan: PoolPlan, checkpoint: Path, device: str, dtype,
                           direct: str | None) -> EngineClient:
    # No fallback to one process: a resource that asks for N ranks gets N, or an error that says why.
    try:
        import ray

        from r1serve.runtime.parallel.group import ExpertParallelGroup
        from r1serve.runtime.parallel.layout import Failover
        from r1serve.runtime.parallel.transport import direct_latents
    except ImportError as exc:
        raise RuntimeError(f"{plan.field('expertParallel')}: {plan.expert_parallel} rank(s) with "
                           f"{plan.gpus_per_rank} GPU(s) each need the expert-parallel runtime, which cannot be "
                           f"imported here: {exc}") from exc
    placement_group = ray.util.get_current_placement_group()
    # Serve reserved the replica's bundles from the same Serve config the plan was read from.
    bundles = placement_group.bundle_specs[1:] if placement_group is not None else plan.rank_bundles
    if len(bundles) != plan.expert_parallel:
        raise RuntimeError(f"{plan.field('expertParallel')}: {plan.expert_parallel} ranks, but the replica's "
                           f"placement group holds {len(bundles)} rank bundles")
    from r1serve.runtime.model.config import ModelConfig

    from .kept_load import kept_load_path, read_kept_load

    config = ModelConfig.from_file(checkpoint)
    # The MTP layer's load too, kept by replicas that drafted (those that do not, leave it unused).
    kept = read_kept_load(kept_load_path(plan.resource, plan.pool), num_experts=config.n_routed_experts,
                          layers=config.expert_layers(mtp=True))
    return ExpertParallelGroup.on_ray(str(checkpoint), [dict(b) for b in bundles], engine=plan.engine,
                                      dtype=str(dtype).removeprefix("torch."), device=device,
                                      redundant=plan.redundant_experts, placement_group=placement_group,
                                      timeout_s=plan.collective_timeout_s,
                                      direct=direct_latents(direct, plan.kv_timeout_s) if direct else None,
                                      rebalance_interval_s=plan.rebalance_interval_s,
                                      failover=Failover(plan.on_rank_failure, plan.failover_headroom_slots),
                                      expert_load=kept, grow_back_interval_s=plan.grow_back_interval_s,
                                      weights=plan.weights)


def _mock_engine(plan: PoolPlan, source: EngineSource) -> EngineClient:
    from r1serve.runtime.engine.mock import MockEngine

    engine = plan.engine
    return MockEngine(role=engine.role, max_model_len=engine.max_model_len, token_delay_s=source.token_delay_s,
                      prefill_delay_s=source.prefill_delay_s, block_size=engine.block_size,
                      num_blocks=engine.num_blocks)
