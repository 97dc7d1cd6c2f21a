"""Prefill and decode pool sections of the R1Deployment spec: replicas, batching, KV cache, autoscaling."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from r1serve.spec import constants as C
from r1serve.spec.base import SpecModel
from r1serve.spec.errors import FieldError, raise_all
from r1serve.spec.workers import Workers

MAX_EXPERT_PARALLEL = 1024


class Replicas(SpecModel):
    """Bounds on the number of replicas (expert-parallel groups) of one pool."""

    min: int = Field(
        1,
        ge=0,
        description="Fewest replicas the autoscaler keeps. 0 lets an idle pool scale to zero "
        "(the first request then waits for a replica to start).",
    )
    max: int = Field(
        1, ge=1, description="Most replicas the autoscaler may run; must be >= min."
    )
    initial: int | None = Field(
        None,
        ge=0,
        description="Replicas started before any load is seen; between min and max. "
        "Unset: min.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "Replicas":
        errors = []
        if self.min > self.max:
            errors.append(FieldError("min", f"must be <= max ({self.max})", self.min))
        if self.initial is not None and not self.min <= self.initial <= self.max:
            errors.append(FieldError(
                "initial", f"must be between min ({self.min}) and max ({self.max})",
                self.initial))
        raise_all(errors)
        return self

    @property
    def effective_initial(self) -> int:
        """Replicas to start with: `initial`, or `min` when it is unset."""
        return self.min if self.initial is None else self.initial


class _Autoscaling(SpecModel):
    upscale_delay_seconds: float = Field(
        30.0,
        ge=0,
        description="How long the load must stay above target before replicas are added; "
        "damps reaction to short bursts.",
    )
    downscale_delay_seconds: float = Field(
        600.0,
        ge=0,
        description="How long the load must stay below target before replicas are removed. "
        "Long on purpose: an EP replica spans many GPUs and takes minutes to load weights.",
    )


class PrefillAutoscaling(_Autoscaling):
    """Queue-depth autoscaling of the prefill pool."""

    target_queued_tokens: int = Field(
        32768,
        gt=0,
        description="Prompt tokens waiting for prefill per replica that the autoscaler aims "
        "for; more queued tokens than this add replicas, fewer remove them.",
    )


class DecodeAutoscaling(_Autoscaling):
    """Queue-depth and KV-cache autoscaling of the decode pool."""

    target_ongoing_requests: int = Field(
        128,
        gt=0,
        description="Running plus waiting sequences per replica that the autoscaler aims "
        "for. Must be reachable: at most maxRunningRequests + maxQueuedRequests.",
    )
    target_kv_cache_usage: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Fraction (0-1] of the KV cache in use per replica above which replicas "
        "are added even if the request target is not reached, so long sequences do not "
        "starve the cache.",
    )


class _Pool(SpecModel):
    replicas: Replicas = Field(
        default_factory=Replicas,
        description="Replica bounds; one replica is one expert-parallel group of "
        "expertParallel ranks. Default: exactly one replica.",
    )
    expert_parallel: int = Field(
        1,
        ge=1,
        le=MAX_EXPERT_PARALLEL,
        description="Ranks (processes, one per GPU group) per replica; the routed experts are "
        "split across them and tokens are exchanged with all-to-all. When "
        "spec.model.numRoutedExperts is set, numRoutedExperts + experts.redundant must be "
        "divisible by this.",
    )
    gpus_per_rank: int = Field(
        1,
        ge=0,
        le=16,
        description="GPUs per rank. 0 runs the rank on CPU (demos and tests).",
    )
    gpus_per_node: int = Field(
        C.GPUS_PER_NODE,
        ge=1,
        le=16,
        description="GPUs of one node of this pool: 8 on HGX H100/H200/H800 nodes, 4 on "
        "GB200 and some cloud shapes. A replica's ranks fill whole nodes, one worker pod per "
        "node, so this sizes the worker pods. Must be a multiple of gpusPerRank.",
    )
    max_batch_tokens: int = Field(
        8192,
        gt=0,
        description="Most tokens one forward step of a replica processes; longer prompts are "
        "prefilled in chunks of this size.",
    )
    max_running_requests: int = Field(
        256,
        gt=0,
        description="Most sequences a replica batches concurrently.",
    )
    max_queued_requests: int = Field(
        1024,
        gt=0,
        description="Back-pressure bound: requests waiting per replica beyond the running "
        "ones; further requests are refused with RESOURCE_EXHAUSTED / HTTP 429.",
    )
    kv_cache_blocks: int | None = Field(
        None,
        ge=1,
        description="KV-cache blocks per replica. Unset: sized from free accelerator memory "
        "at start-up. When set it must hold at least one maxModelLen sequence.",
    )
    block_size: int = Field(
        64,
        ge=16,
        le=1024,
        description="Tokens per KV-cache block, a power of two from 16 to 1024. Prefix reuse "
        "works in whole blocks.",
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="Implementation of the hot loops: triton runs the fused MoE and paged MLA "
        "decode kernels (GPUs), torch the plain PyTorch path (CPU, and the reference); auto "
        "picks triton on GPUs and torch on CPU.",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay decode steps from CUDA graphs captured at start-up, one per batch-size "
        "bucket (GPUs with the triton kernels and expertParallel 1; otherwise decode runs "
        "eagerly). false turns them off.",
    )
    workers: Workers | None = Field(
        None,
        description="Overrides of spec.workers for this pool's pods (e.g. a different GPU "
        "node selector); unset fields fall back to spec.workers.",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two from 16 to 1024")
        return value

    @model_validator(mode="after")
    def _ranks_fit_a_node(self) -> "_Pool":
        # A rank's GPUs share one node (NVLink); whole ranks must fill the node.
        if self.gpus_per_rank and self.gpus_per_node % self.gpus_per_rank:
            raise FieldError("gpusPerNode", f"must be a multiple of gpusPerRank ({self.gpus_per_rank})",
                             self.gpus_per_node)
        if self.kernels == "triton" and not self.gpus_per_rank:
            raise FieldError("kernels", "triton needs GPUs (gpusPerRank > 0); use auto or torch on CPU", self.kernels)
        return self


class PrefillPool(_Pool):
    """The pool that runs prompts and hands their KV cache to the decode pool."""

    autoscaling: PrefillAutoscaling = Field(
        default_factory=PrefillAutoscaling,
        description="Scaling on queued prompt tokens per replica.",
    )


class DecodePool(_Pool):
    """The pool that generates tokens (and also prefills when disaggregation is off)."""

    autoscaling: DecodeAutoscaling = Field(
        default_factory=DecodeAutoscaling,
        description="Scaling on running plus waiting sequences and KV-cache use per replica.",
    )

    @model_validator(mode="after")
    def _reachable_target(self) -> "DecodePool":
        # A replica refuses work beyond running + queued, so a higher target never triggers.
        reachable = self.max_running_requests + self.max_queued_requests
        target = self.autoscaling.target_ongoing_requests
        if target > reachable:
            raise FieldError(
                "autoscaling.targetOngoingRequests",
                f"must be <= maxRunningRequests + maxQueuedRequests ({reachable}), "
                "otherwise the pool never scales up",
                target,
            )
        return self
