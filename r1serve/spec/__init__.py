"""The R1Deployment spec: the single source of truth for the resource."""

from r1serve.spec.errors import SpecError
from r1serve.spec.load import load_r1deployment, loads_r1deployment, parse_r1deployment
from r1serve.spec.model import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Metadata,
    Pool,
    R1Deployment,
    R1DeploymentSpec,
    Role,
)
from r1serve.spec.pool import (
    DecodeAutoscaling,
    DecodePool,
    PrefillAutoscaling,
    PrefillPool,
    Replicas,
)
from r1serve.spec.sections import (
    DEFAULT_TINY_PRESET,
    RESERVED_PORTS,
    RESERVED_RAY_PORTS,
    TINY_PREFIX,
    ApiAuth,
    ApiSpec,
    ApiTLS,
    Experts,
    KVTransfer,
    ModelSpec,
    ModelVolume,
    NfsVolume,
    Ratio,
)
from r1serve.spec.upgrade import ClusterUpgradeOptions, Upgrade
from r1serve.spec.workers import WorkerResources, Workers

__all__ = [
    "API_VERSION",
    "DEFAULT_TINY_PRESET",
    "GROUP",
    "KIND",
    "PLURAL",
    "RESERVED_PORTS",
    "RESERVED_RAY_PORTS",
    "TINY_PREFIX",
    "VERSION",
    "ApiAuth",
    "ApiSpec",
    "ApiTLS",
    "ClusterUpgradeOptions",
    "DecodeAutoscaling",
    "DecodePool",
    "Experts",
    "KVTransfer",
    "Metadata",
    "ModelSpec",
    "ModelVolume",
    "NfsVolume",
    "Pool",
    "PrefillAutoscaling",
    "PrefillPool",
    "R1Deployment",
    "R1DeploymentSpec",
    "Ratio",
    "Replicas",
    "Role",
    "SpecError",
    "Upgrade",
    "WorkerResources",
    "Workers",
    "load_r1deployment",
    "loads_r1deployment",
    "parse_r1deployment",
]
