"""Worker pod settings of the R1Deployment spec (image, placement, resources), with per-pool overrides."""

from typing import Any

from pydantic import Field, field_validator

from r1serve.spec.base import NonBlank, Quantity, SpecModel
from r1serve.spec.errors import FieldError, raise_all

_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class WorkerResources(SpecModel):
    """CPU and memory requested for each expert-parallel rank."""

    cpu: Quantity | None = Field(
        None,
        description="CPU cores requested per expert-parallel rank, as a Kubernetes quantity "
        "('8', '500m'). The operator multiplies it by the ranks it places in one pod. "
        "Unset: the operator's default.",
    )
    memory: Quantity | None = Field(
        None,
        description="Memory requested per expert-parallel rank, as a Kubernetes quantity "
        "('64Gi'). Unset: the operator's default.",
    )


def _check_toleration(index: int, toleration: dict[str, Any]) -> list[FieldError]:
    where = f"[{index}]"
    errors = [
        FieldError(f"{where}.{key}", "unknown toleration key; allowed: "
                   + ", ".join(sorted(_TOLERATION_KEYS)), toleration[key])
        for key in toleration
        if key not in _TOLERATION_KEYS
    ]
    operator = toleration.get("operator", "Equal")
    if operator not in _TOLERATION_OPERATORS:
        errors.append(FieldError(f"{where}.operator", "must be Exists or Equal", operator))
    effect = toleration.get("effect")
    if effect is not None and effect not in _TOLERATION_EFFECTS:
        errors.append(FieldError(
            f"{where}.effect", "must be NoSchedule, PreferNoSchedule or NoExecute", effect))
    seconds = toleration.get("tolerationSeconds")
    if seconds is not None and (not isinstance(seconds, int) or isinstance(seconds, bool)):
        errors.append(FieldError(f"{where}.tolerationSeconds", "must be an integer", seconds))
    for key in ("key", "value"):
        if key in toleration and not isinstance(toleration[key], str):
            errors.append(FieldError(f"{where}.{key}", "must be a string", toleration[key]))
    return errors


class Workers(SpecModel):
    """How the worker pods that run expert-parallel ranks are built and placed."""

    image: NonBlank | None = Field(
        None,
        description="Container image of the Ray worker pods (it must contain r1serve and a "
        "Ray version matching the head). Unset: the image the operator was installed with.",
    )
    node_selector: dict[str, str] | None = Field(
        None,
        description="Node labels a worker pod requires, e.g. {nvidia.com/gpu.product: "
        "NVIDIA-H100-80GB-HBM3}. A pool's own workers.nodeSelector is merged over this one "
        "key by key.",
    )
    tolerations: list[dict[str, Any]] | None = Field(
        None,
        description="Kubernetes tolerations of the worker pods (key, operator, value, effect, "
        "tolerationSeconds), typically for tainted GPU nodes. A pool's own list replaces "
        "this one.",
    )
    resources: WorkerResources | None = Field(
        None,
        description="CPU and memory per expert-parallel rank; GPUs come from gpusPerRank. A "
        "pool's own values override these one by one.",
    )
    shm_size: Quantity | None = Field(
        None,
        description="Size of the shared-memory volume (/dev/shm) of each worker pod, used by "
        "the Ray object store and NCCL, e.g. '64Gi'. Unset: the operator's default.",
    )

    @field_validator("tolerations")
    @classmethod
    def _valid_tolerations(cls, value: list[dict[str, Any]] | None) -> Any:
        errors = [err for i, tol in enumerate(value or []) for err in _check_toleration(i, tol)]
        raise_all(errors)
        return value

    def merged_with(self, override: "Workers | None") -> "Workers":
        """These settings with a pool's override applied, every unset field filled.

        nodeSelector and resources merge key by key (a pool usually adds one GPU label to a
        shared selector); image, shmSize and tolerations are replaced as a whole because a
        half-merged toleration list is never what anyone means.
        """
        over = override or Workers()
        base_res = self.resources or WorkerResources()
        over_res = over.resources or WorkerResources()
        return Workers(
            image=over.image if over.image is not None else self.image,
            node_selector={**(self.node_selector or {}), **(over.node_selector or {})},
            tolerations=list(
                over.tolerations if over.tolerations is not None else self.tolerations or []
            ),
            resources=WorkerResources(
                cpu=over_res.cpu if over_res.cpu is not None else base_res.cpu,
                memory=over_res.memory if over_res.memory is not None else base_res.memory,
            ),
            shm_size=over.shm_size if over.shm_size is not None else self.shm_size,
        )
