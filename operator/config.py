"""Operator-wide settings (default image, pod sizing defaults), from flags or environment variables."""

import dataclasses
import os
from collections.abc import Mapping

from r1serve.spec import quantity


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Defaults the operator fills in where an R1Deployment leaves a field unset."""

    default_image: str | None = None   # None: the r1serve image per pool kind (cpu or gpu)
    rank_memory: str = "8Gi"           # per expert-parallel rank without workers.resources.memory
    shm_size: str = "8Gi"              # /dev/shm of each Ray pod without workers.shmSize
    head_cpu: str = "4"                # the head runs the Serve controller, proxies and Ingress
    head_memory: str = "16Gi"
    kuberay_retry_seconds: float = 60.0  # retry period while the KubeRay CRDs are missing

    def __post_init__(self) -> None:
        if self.kuberay_retry_seconds <= 0:
            raise ValueError("operator setting kuberay_retry_seconds: must be > 0 "
                             f"(got {self.kuberay_retry_seconds!r})")
        for field in ("rank_memory", "shm_size", "head_cpu", "head_memory"):
            try:
                quantity.check(getattr(self, field))
            except ValueError as exc:
                raise ValueError(f"operator setting {field}: {exc} "
                                 f"(got {getattr(self, field)!r})") from None
        if self.default_image is not None and (
                not self.default_image.strip() or self.default_image.endswith(":latest")):
            raise ValueError(f"operator setting default_image: must be a pinned tag, not "
                             f"empty or ':latest' (got {self.default_image!r})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorConfig":
        """Settings from R1SERVE_<FIELD> variables (R1SERVE_DEFAULT_IMAGE, R1SERVE_RANK_MEMORY,
        R1SERVE_SHM_SIZE, R1SERVE_HEAD_CPU, R1SERVE_HEAD_MEMORY, R1SERVE_KUBERAY_RETRY_SECONDS);
        unset variables keep the defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            value = env.get(f"R1SERVE_{field.name.upper()}")
            if value:
                values[field.name] = float(value) if field.type in (float, "float") else value
        return cls(**values)
