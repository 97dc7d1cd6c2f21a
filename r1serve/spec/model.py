"""The R1Deployment resource: metadata, the spec and its cross-section rules, the manifest form."""

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from r1serve.spec.base import SpecModel, check_dns_1035_label, check_dns_1123_label
from r1serve.spec.errors import FieldError, raise_all
from r1serve.spec.pool import DecodePool, PrefillPool
from r1serve.spec.sections import (
    CUDA_IPC_NEEDS_GPU_POOLS,
    FP8_NEEDS_GPUS,
    GLOO_NEEDS_CPU_POOLS,
    NCCL_REFUSED,
    ApiSpec,
    Experts,
    KVTransfer,
    ModelSpec,
    Ratio,
    Speculative,
)
from r1serve.spec.upgrade import INCREMENTAL, Upgrade
from r1serve.spec.workers import Workers

GROUP = "r1serve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "R1Deployment"
PLURAL = "r1deployments"

Role = Literal["prefill", "decode"]
Pool = PrefillPool | DecodePool

# Written by the API server; present in `kubectl get -o yaml` output and in operator event
# bodies, so they are accepted and dropped rather than reported as unknown fields.
_SERVER_METADATA = frozenset({
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink", "finalizers", "ownerReferences",
})


class Metadata(SpecModel):
    """Kubernetes object metadata of the resource (the subset r1serve uses)."""

    name: Annotated[str, AfterValidator(check_dns_1035_label)] = Field(
        description="Name of the deployment; prefixes every object the operator creates. A "
        "DNS-1035 label of at most 40 characters so derived names stay within limits.",
    )
    namespace: Annotated[str, AfterValidator(check_dns_1123_label)] = Field(
        "default", description="Namespace of the resource and of everything it creates."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels of the resource itself; the operator copies "
        "them nowhere (spec.workers.podLabels labels the Ray pods)."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the resource."
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_server_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in _SERVER_METADATA}
        return data


def _check_pools(spec: "R1DeploymentSpec") -> list[FieldError]:
    if spec.disaggregation and spec.prefill is None:
        return [FieldError("prefill", "required when disaggregation is true; set "
                           "disaggregation: false to let the decode pool prefill too")]
    if not spec.disaggregation:
        errors = []
        if spec.prefill is not None:
            errors.append(FieldError("prefill", "must be omitted when disaggregation is "
                                     "false: the decode pool runs prompts too"))
        if spec.ratio is not None:
            errors.append(FieldError("ratio", "needs disaggregation: true (there is no "
                                     "prefill pool to keep in ratio)"))
        return errors
    return []


def _check_ratio(spec: "R1DeploymentSpec") -> list[FieldError]:
    if spec.ratio is None or spec.prefill is None or not spec.disaggregation:
        return []
    pre, dec = spec.prefill.replicas, spec.decode.replicas
    # A decode pool at zero replicas has no ratio, so its lower bound counts as one.
    highest = pre.max / max(dec.min, 1)
    lowest = pre.min / dec.max
    if spec.ratio.min > highest:
        return [FieldError("ratio.min", f"is above the highest reachable ratio {highest:g} "
                           "(prefill.replicas.max / decode.replicas.min)", spec.ratio.min)]
    if spec.ratio.max < lowest:
        return [FieldError("ratio.max", f"is below the lowest reachable ratio {lowest:g} "
                           "(prefill.replicas.min / decode.replicas.max)", spec.ratio.max)]
    return []


def _check_divisibility(spec: "R1DeploymentSpec") -> list[FieldError]:
    routed = spec.model.num_routed_experts
    if routed is None:
        return []
    redundant = spec.experts.redundant
    total = routed + redundant
    errors = []
    for role, pool in spec.active_pools().items():
        ep = pool.expert_parallel
        if total % ep:
            fix = math.ceil(total / ep) * ep - routed
            errors.append(FieldError(
                f"{role}.expertParallel",
                f"numRoutedExperts + experts.redundant = {routed} + {redundant} = {total} "
                f"experts cannot be split evenly across {ep} ranks (e.g. experts.redundant: "
                f"{fix} would fit)",
                ep,
            ))
    return errors


def _check_kv_cache(spec: "R1DeploymentSpec") -> list[FieldError]:
    errors = []
    for role, pool in spec.active_pools().items():
        blocks = pool.kv_cache_blocks
        if blocks is not None and blocks * pool.block_size < spec.model.max_model_len:
            errors.append(FieldError(
                f"{role}.kvCacheBlocks",
                f"{blocks} blocks x {pool.block_size} tokens cannot hold one "
                f"model.maxModelLen ({spec.model.max_model_len}) sequence",
                blocks,
            ))
    return errors


def _check_connector(spec: "R1DeploymentSpec") -> list[FieldError]:
    connector = spec.kv_transfer.connector
    if connector == "nccl" and spec.disaggregation:
        return [FieldError("kvTransfer.connector", NCCL_REFUSED, connector)]
    if connector == "gloo" and any(pool.gpus_per_rank for pool in spec.active_pools().values()):
        return [FieldError("kvTransfer.connector", GLOO_NEEDS_CPU_POOLS, connector)]
    if connector == "cuda-ipc" and not all(pool.gpus_per_rank for pool in spec.active_pools().values()):
        return [FieldError("kvTransfer.connector", CUDA_IPC_NEEDS_GPU_POOLS, connector)]
    return []


def _check_weights(spec: "R1DeploymentSpec") -> list[FieldError]:
    if spec.model.weights == "fp8" and not all(pool.gpus_per_rank for pool in spec.active_pools().values()):
        return [FieldError("model.weights", FP8_NEEDS_GPUS, spec.model.weights)]
    return []


def _check_upgrade(spec: "R1DeploymentSpec") -> list[FieldError]:
    # The Gateway KubeRay builds for an incremental upgrade sends plaintext HTTP to Serve's
    # HTTP port, which api.tls turns into a TLS-only port: every request through it would fail.
    if spec.upgrade.strategy == INCREMENTAL and spec.api.tls is not None:
        return [FieldError("upgrade.strategy", "cannot be combined with api.tls: the Gateway "
                           "KubeRay creates for it speaks plaintext HTTP to Serve's HTTP port, "
                           "which api.tls makes TLS-only", spec.upgrade.strategy)]
    return []


class R1DeploymentSpec(SpecModel):
    """Desired state of one DeepSeek-R1-class serving deployment."""

    model: ModelSpec = Field(description="The checkpoint to serve and how to run it.")
    disaggregation: bool = Field(
        True,
        description="true: prompts run on the prefill pool and generation on the decode pool "
        "(both sections required). false: the decode pool does both and the prefill "
        "section (and ratio) must be omitted.",
    )
    prefill: PrefillPool | None = Field(
        None,
        description="The pool that processes prompts; required when disaggregation is true, "
        "omitted otherwise.",
    )
    decode: DecodePool = Field(
        description="The pool that generates tokens (and processes prompts too when "
        "disaggregation is false).",
    )
    ratio: Ratio | None = Field(
        None,
        description="Optional band for prefill replicas / decode replicas that the "
        "autoscaler keeps; must be reachable within both pools' replica bounds.",
    )
    experts: Experts = Field(
        default_factory=Experts, description="Redundant expert copies and rebalancing."
    )
    kv_transfer: KVTransfer = Field(
        default_factory=KVTransfer, description="Prefill-to-decode KV-cache hand-off."
    )
    speculative: Speculative | None = Field(
        None,
        description="Speculative decoding with the checkpoint's MTP layer as the draft model; off "
        "when omitted.",
    )
    api: ApiSpec = Field(
        default_factory=ApiSpec, description="Client-facing gRPC and HTTP endpoints."
    )
    workers: Workers = Field(
        default_factory=Workers,
        description="Worker pod settings shared by both pools; each pool may override them.",
    )
    upgrade: Upgrade = Field(
        default_factory=Upgrade,
        description="How KubeRay rolls out a change of the Ray cluster (image, resources, "
        "volumes, ...): a full new cluster (default), an incremental one, or none.",
    )

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "R1DeploymentSpec":
        errors = _check_pools(self)
        for check in (_check_ratio, _check_divisibility, _check_kv_cache, _check_connector,
                      _check_weights, _check_upgrade):
            errors += check(self)
        raise_all(errors)
        return self

    def active_pools(self) -> dict[Role, Pool]:
        """The pools that actually run, by role: decode only when disaggregation is off."""
        if self.disaggregation and self.prefill is not None:
            return {"prefill": self.prefill, "decode": self.decode}
        return {"decode": self.decode}

    def workers_for(self, role: Role) -> Workers:
        """Effective worker settings of a pool: spec.workers with the pool's override merged."""
        pool = self.prefill if role == "prefill" else self.decode
        return self.workers.merged_with(pool.workers if pool is not None else None)


class R1Deployment(SpecModel):
    """An R1Deployment resource (apiVersion r1serve.io/v1alpha1); `status` is not modelled."""

    api_version: Literal["r1serve.io/v1alpha1"] = Field(
        API_VERSION, description="Always r1serve.io/v1alpha1."
    )
    kind: Literal["R1Deployment"] = Field(KIND, description="Always R1Deployment.")
    metadata: Metadata = Field(description="Name, namespace, labels and annotations.")
    spec: R1DeploymentSpec = Field(description="Desired state of the deployment.")

    @model_validator(mode="before")
    @classmethod
    def _ignore_status(cls, data: Any) -> Any:
        # The operator owns status; accepting it lets `kubectl get -o yaml` output be re-applied.
        if isinstance(data, dict) and "status" in data:
            return {k: v for k, v in data.items() if k != "status"}
        return data

    @property
    def served_model_name(self) -> str:
        """The model name clients use: spec.model.servedModelName or metadata.name."""
        return self.spec.model.served_model_name or self.metadata.name

    def to_manifest(self) -> dict[str, Any]:
        """The camelCase document a user would `kubectl apply`, with defaults filled in."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
