"""The one place a pool replica gets its engine: an in-process engine, an expert-parallel group, or a mock."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from r1serve.runtime.engine.interface import EngineClient
from r1serve.spec import Pool, R1Deployment
from r1serve.spec.serve_config import rank_cpus

EngineRole = Literal["both", "prefill", "decode"]
# Sequences of maxModelLen tokens the KV cache holds when spec.<pool>.kvCacheBlocks is unset (a CPU
# default; on GPUs the EP group sizes its cache from free memory).
DEFAULT_CACHED_SEQUENCES = 8


def pool_for(deployment: R1Deployment, role: EngineRole) -> Pool:
    """The spec section a role's replicas follow: without disaggregation the decode pool does both."""
    spec = deployment.spec
    if role == "prefill":
        if spec.prefill is None or not spec.disaggregation:
            raise ValueError("spec.prefill: a prefill engine needs disaggregation: true and a prefill pool")
        return spec.prefill
    return spec.decode


def kv_cache_blocks(deployment: R1Deployment, pool: Pool) -> int:
    if pool.kv_cache_blocks is not None:
        return pool.kv_cache_blocks
    per_sequence = math.ceil(deployment.spec.model.max_model_len / pool.block_size)
    return per_sequence * min(pool.max_running_requests, DEFAULT_CACHED_SEQUENCES)


def engine_config(deployment: R1Deployment, role: EngineRole):
    """The EngineConfig of one replica, from its pool's section of the spec."""
    from r1serve.runtime.engine.engine import EngineConfig

    pool = pool_for(deployment, role)
    return EngineConfig(
        role=role,
        num_blocks=kv_cache_blocks(deployment, pool),
        block_size=pool.block_size,
        max_batch_tokens=pool.max_batch_tokens,
        max_running=pool.max_running_requests,
        max_model_len=deployment.spec.model.max_model_len,
        kernels=pool.kernels,
        # With more ranks the all-to-all sizes its exchanges on the host, which a graph cannot capture.
        cuda_graphs=pool.cuda_graphs and pool.expert_parallel == 1,
    )


def torch_dtype(deployment: R1Deployment, device: str):
    import torch

    name = deployment.spec.model.dtype
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def make_engine_client(deployment: R1Deployment, role: EngineRole, checkpoint: Path) -> EngineClient:
    """The engine of one pool replica: one EP group of expertParallel ranks, or the engine in this process."""
    pool = pool_for(deployment, role)
    if pool.expert_parallel > 1:
        # No fallback to one process: a resource that asks for N ranks gets N, or an error that says why.
        try:
            from r1serve.runtime.parallel.serve_group import make_ep_group_client
        except ImportError as exc:
            raise RuntimeError(f"spec.{_spec_role(role)}.expertParallel: {pool.expert_parallel} ranks need the "
                               f"expert-parallel runtime, which cannot be imported here: {exc}") from exc
        return make_ep_group_client(deployment, role, checkpoint)
    return _local_engine(deployment, role, checkpoint, pool)


def _local_engine(deployment: R1Deployment, role: EngineRole, checkpoint: Path, pool: Pool) -> EngineClient:
    import torch

    from r1serve.runtime.engine.async_engine import AsyncEngine
    from r1serve.runtime.engine.engine import LLMEngine

    device = "cuda" if pool.gpus_per_rank and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The replica actor reserves one CPU, but the model runs for the rank(s) the spec sized.
        threads = max(1, min(int(rank_cpus(deployment.spec.workers_for(_spec_role(role)))), os.cpu_count() or 1))
        torch.set_num_threads(threads)
    engine = LLMEngine.from_checkpoint(checkpoint, engine_config(deployment, role),
                                       dtype=torch_dtype(deployment, device), device=device)
    return AsyncEngine(engine)


def make_mock_client(deployment: R1Deployment, role: EngineRole, options: Mapping[str, Any]) -> EngineClient:
    """A MockEngine sized like the real one; for tests of the graph where the model is not the point."""
    from r1serve.runtime.engine.mock import MockEngine

    pool = pool_for(deployment, role)
    return MockEngine(role=role, max_model_len=deployment.spec.model.max_model_len,
                      token_delay_s=float(options.get("token_delay_s", 0.0)),
                      prefill_delay_s=float(options.get("prefill_delay_s", 0.0)), block_size=pool.block_size,
                      num_blocks=kv_cache_blocks(deployment, pool))


def _spec_role(role: EngineRole) -> Literal["prefill", "decode"]:
    return "prefill" if role == "prefill" else "decode"
