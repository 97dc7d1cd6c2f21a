"""The upgrade section of the R1Deployment spec: how KubeRay replaces the Ray cluster on a cluster change."""

from typing import Literal

from pydantic import Field, model_validator

from r1serve.spec.base import ObjectName, SpecModel
from r1serve.spec.errors import FieldError

NEW_CLUSTER = "NewCluster"
INCREMENTAL = "NewClusterWithIncrementalUpgrade"
NO_UPGRADE = "None"
Strategy = Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]
# KubeRay's field is an int32.
MAX_INTERVAL_SECONDS = 2**31 - 1


class ClusterUpgradeOptions(SpecModel):
    """Pace of an incremental upgrade: capacity moves in steps of maxSurgePercent, HTTP traffic
    follows in steps of stepSizePercent every intervalSeconds."""

    gateway_class_name: ObjectName = Field(
        description="GatewayClass (Gateway API) of the Gateway KubeRay creates to split HTTP "
        "traffic between the old and the new cluster, e.g. istio.",
    )
    step_size_percent: int = Field(
        ge=1,
        le=100,
        description="Share of HTTP traffic moved from the old to the new cluster per step; "
        "at most maxSurgePercent.",
    )
    interval_seconds: int = Field(
        ge=1,
        le=MAX_INTERVAL_SECONDS,
        description="Seconds between two traffic steps.",
    )
    max_surge_percent: int = Field(
        100,
        ge=1,
        le=100,
        description="Share of the deployment's replicas the new cluster gains per step (the "
        "old one then gives up as much), so at most this much capacity runs twice. Rounded "
        "to whole replicas, at least one. 100: the new cluster scales up fully at once.",
    )

    @model_validator(mode="after")
    def _step_within_surge(self) -> "ClusterUpgradeOptions":
        # KubeRay refuses the whole RayService otherwise, long after the apply succeeded.
        if self.step_size_percent > self.max_surge_percent:
            raise FieldError("stepSizePercent", f"must be <= maxSurgePercent "
                             f"({self.max_surge_percent})", self.step_size_percent)
        return self


class Upgrade(SpecModel):
    """How a change of the Ray cluster (image, resources, volumes, ...) is rolled out."""

    strategy: Strategy = Field(
        NEW_CLUSTER,
        description="NewCluster: KubeRay starts a full new Ray cluster and switches all traffic "
        "once it serves (twice the resources meanwhile). NewClusterWithIncrementalUpgrade: the "
        "new cluster grows and the old one shrinks step by step while HTTP traffic moves "
        "through a Gateway (needs clusterUpgradeOptions, the Gateway API and a Gateway "
        "controller). None: cluster changes are not rolled out at all (Serve config changes "
        "still are). Ignored by the local runner.",
    )
    cluster_upgrade_options: ClusterUpgradeOptions | None = Field(
        None,
        description="Required with strategy NewClusterWithIncrementalUpgrade, not allowed "
        "otherwise.",
    )

    @model_validator(mode="after")
    def _options_exactly_when_incremental(self) -> "Upgrade":
        options = self.cluster_upgrade_options
        if self.strategy == INCREMENTAL and options is None:
            raise FieldError("clusterUpgradeOptions", f"required when strategy is {INCREMENTAL}"
                             " (gatewayClassName, stepSizePercent, intervalSeconds)")
        if self.strategy != INCREMENTAL and options is not None:
            raise FieldError("clusterUpgradeOptions", f"only allowed with strategy {INCREMENTAL}"
                             f" (strategy is {self.strategy})", options)
        return self
