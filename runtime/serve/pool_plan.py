"""What one pool's replicas run, resolved once from the parsed R1Deployment when the application is built.

A pool (`prefill` or `decode`, the spec's Role) is one Serve deployment; its engine role says what the
engine does: `prefill` and `decode` under disaggregation, `both` when the decode pool serves alone.
Replicas get the plan bound as an argument and read nothing else of the resource for their engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from r1serve.runtime.engine.engine import EngineConfig
from r1serve.runtime.engine.outputs import Role as EngineRole
from r1serve.spec import Pool, R1Deployment, Role
from r1serve.spec import constants as C
from r1serve.spec.serve_config import rank_cpus

# Sequences of maxModelLen tokens the KV cache holds when spec.<pool>.kvCacheBlocks is unset (a CPU
# default; on GPUs the EP group sizes its cache from free memory).
DEFAULT_CACHED_SEQUENCES = 8


@dataclass(frozen=True)
class PoolPlan:
    pool: Role  # the spec section (spec.prefill or spec.decode) and the name metrics and status use
    deployment: str  # the Serve deployment's name
    engine: EngineConfig  # engine.role: the engine role
    expert_parallel: int
    gpus_per_rank: int
    dtype: str  # spec.model.dtype: auto resolves on the replica, where the device is known
    redundant_experts: int
    cpu_threads: int  # torch threads of a rank on CPU (the Ray CPUs the spec reserves per rank)
    # The rank bundles the Serve config reserves (bundle 0 is the replica itself); a replica uses its
    # own placement group's, these only where it runs outside one.
    rank_bundles: tuple[Mapping[str, float], ...]
    kv_timeout_s: float = 30.0  # spec.kvTransfer.timeoutSeconds
    rebalance_interval_s: float | None = None  # spec.experts.rebalanceIntervalSeconds (None: never)
    on_rank_failure: str = "degrade"  # spec.experts.onRankFailure
    collective_timeout_s: float = 60.0  # spec.experts.collectiveTimeoutSeconds
    resource: str = ""  # metadata.name: whose kept expert load the replicas read and offer
    failover_headroom_slots: int = 0  # spec.experts.failoverHeadroomSlots
    grow_back_interval_s: float = 30.0  # spec.experts.growBackIntervalSeconds
    weights: str = "dequantized"  # spec.model.weights: auto resolves on the replica, where the GPU is known

    @property
    def engine_role(self) -> EngineRole:
        return self.engine.role

    def field(self, name: str) -> str:
        """The spec path of one of this pool's fields, as errors name it."""
        return f"spec.{self.pool}.{name}"


def engine_role(deployment: R1Deployment, pool: Role) -> EngineRole:
    """Without disaggregation the decode pool does both prefill and decode."""
    if pool == "prefill":
        return "prefill"
    return "decode" if "prefill" in deployment.spec.active_pools() else "both"


def kv_cache_blocks(deployment: R1Deployment, pool: Pool) -> int:
    if pool.kv_cache_blocks is not None:
        return pool.kv_cache_blocks
    per_sequence = math.ceil(deployment.spec.model.max_model_len / pool.block_size)
    return per_sequence * min(pool.max_running_requests, DEFAULT_CACHED_SEQUENCES)


def engine_config(deployment: R1Deployment, pool_name: Role) -> EngineConfig:
    """The EngineConfig of one pool's replicas, from its section of the spec."""
    pool = deployment.spec.active_pools()[pool_name]
    return EngineConfig(
        role=engine_role(deployment, pool_name),
        num_blocks=kv_cache_blocks(deployment, pool),
        block_size=pool.block_size,
        max_batch_tokens=pool.max_batch_tokens,
        max_running=pool.max_running_requests,
        max_model_len=deployment.spec.model.max_model_len,
        kernels=pool.kernels,
        # With more ranks the all-to-all sizes its exchanges on the host, which a graph cannot capture.
        cuda_graphs=pool.cuda_graphs and pool.expert_parallel == 1,
        speculative_tokens=deployment.spec.speculative.num_tokens if deployment.spec.speculative else 0,
    )


def plan_pools(deployment: R1Deployment, options: Mapping[str, Mapping[str, Any]]) -> dict[Role, PoolPlan]:
    """One plan per active pool; `options` are the Serve deployment options by deployment name."""
    plans = {}
    for name, pool in deployment.spec.active_pools().items():
        deployment_name = C.POOL_DEPLOYMENTS[name]
        bundles = options[deployment_name]["placement_group_bundles"][1:]
        plans[name] = PoolPlan(
            pool=name, deployment=deployment_name, engine=engine_config(deployment, name),
            expert_parallel=pool.expert_parallel, gpus_per_rank=pool.gpus_per_rank,
            dtype=deployment.spec.model.dtype, redundant_experts=deployment.spec.experts.redundant,
            cpu_threads=max(1, int(rank_cpus(deployment.spec.workers_for(name)))),
            rank_bundles=tuple(dict(b) for b in bundles),
            kv_timeout_s=deployment.spec.kv_transfer.timeout_seconds,
            rebalance_interval_s=deployment.spec.experts.rebalance_interval_seconds,
            on_rank_failure=deployment.spec.experts.on_rank_failure,
            collective_timeout_s=deployment.spec.experts.collective_timeout_seconds,
            failover_headroom_slots=deployment.spec.experts.failover_headroom_slots,
            grow_back_interval_s=deployment.spec.experts.grow_back_interval_seconds,
            weights=deployment.spec.model.weights, resource=deployment.metadata.name)
    return plans
