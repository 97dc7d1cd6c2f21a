"""Worker pod settings of the R1Deployment spec (image, placement, resources), with per-pool overrides."""

from typing import Any

from pydantic import Field, field_validator

from r1serve.spec import constants as C
from r1serve.spec.base import (
    LABEL_KEY_RULE,
    LABEL_VALUE_RULE,
    NonBlank,
    Quantity,
    SpecModel,
    is_label_key,
    is_label_value,
)
from r1serve.spec.errors import FieldError, raise_all

_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Bounds that keep the CRD's CEL rules on every key and toleration within the API server's cost
# budget; far above what a pod needs.
MAX_LABELS = 64
MAX_TOLERATIONS = 32
RESERVED_LABELS = ", ".join([*C.RESERVED_POD_LABELS,
                             *(f"{prefix}*" for prefix in C.RESERVED_POD_LABEL_PREFIXES)])


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
    return errors + _toleration_rules(where, toleration, operator, effect)


def _toleration_rules(where: str, toleration: dict[str, Any], operator: Any,
                      effect: Any) -> list[FieldError]:
    """What Kubernetes refuses only when it creates a pod, long after the resource was accepted."""
    errors = []
    key, value = toleration.get("key", ""), toleration.get("value", "")
    if isinstance(key, str) and key and not is_label_key(key):
        errors.append(FieldError(f"{where}.key", LABEL_KEY_RULE, key))
    if key == "" and operator != "Exists":
        message = ("required unless operator is Exists (an empty key with Exists tolerates "
                   "every taint)")
        errors.append(FieldError(f"{where}.key", message, "") if "key" in toleration
                      else FieldError(f"{where}.key", message))
    if operator == "Exists" and value:
        errors.append(FieldError(f"{where}.value", "must be empty when operator is Exists "
                                 "(Exists matches any value of the key)", value))
    elif isinstance(value, str) and not is_label_value(value):
        errors.append(FieldError(f"{where}.value", LABEL_VALUE_RULE, value))
    if toleration.get("tolerationSeconds") is not None and effect != "NoExecute":
        errors.append(FieldError(f"{where}.tolerationSeconds", "needs effect: NoExecute (only "
                                 "a NoExecute taint evicts a pod, after this many seconds)",
                                 toleration["tolerationSeconds"]))
    return errors


def _check_labels(labels: dict[str, str], *, reserved: bool) -> list[FieldError]:
    """Label keys and values as Kubernetes validates them; with `reserved`, keys r1serve and
    KubeRay set themselves are refused too (a pod label cannot take over their selectors)."""
    if len(labels) > MAX_LABELS:
        return [FieldError("", f"must have at most {MAX_LABELS} entries, not {len(labels)}")]
    errors = []
    for key, value in labels.items():
        if not is_label_key(key):
            errors.append(FieldError("", f"key {LABEL_KEY_RULE}", key))
        elif reserved and (key in C.RESERVED_POD_LABELS
                           or key.startswith(C.RESERVED_POD_LABEL_PREFIXES)):
            errors.append(FieldError("", f"key is reserved for r1serve and KubeRay "
                                     f"({RESERVED_LABELS})", key))
        if not is_label_value(value):
            errors.append(FieldError(key, LABEL_VALUE_RULE, value))
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
        json_schema_extra={"maxProperties": MAX_LABELS},
        description="Node labels a worker pod requires, e.g. {nvidia.com/gpu.product: "
        "NVIDIA-H100-80GB-HBM3}. A pool's own workers.nodeSelector is merged over this one "
        "key by key.",
    )
    pod_labels: dict[str, str] | None = Field(
        None,
        json_schema_extra={"maxProperties": MAX_LABELS},
        description="Labels of the Ray pods (head and workers), e.g. for cost allocation or "
        "network policies. The head gets these; a pool's own workers.podLabels is merged over "
        "them key by key. Not r1serve's own keys (app.kubernetes.io/name, instance, component, "
        "managed-by, part-of, r1serve.io/*) nor KubeRay's (ray.io/*). Changing them brings up a "
        "new Ray cluster, like any pod change; the resource's own metadata.labels reach no pod.",
    )
    tolerations: list[dict[str, Any]] | None = Field(
        None,
        json_schema_extra={"maxItems": MAX_TOLERATIONS},
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

    @field_validator("node_selector")
    @classmethod
    def _valid_node_selector(cls, value: dict[str, str] | None) -> Any:
        raise_all(_check_labels(value or {}, reserved=False))
        return value

    @field_validator("pod_labels")
    @classmethod
    def _valid_pod_labels(cls, value: dict[str, str] | None) -> Any:
        raise_all(_check_labels(value or {}, reserved=True))
        return value

    @field_validator("tolerations")
    @classmethod
    def _valid_tolerations(cls, value: list[dict[str, Any]] | None) -> Any:
        if len(value or []) > MAX_TOLERATIONS:
            raise FieldError("", f"must have at most {MAX_TOLERATIONS} entries, not {len(value)}")
        errors = [err for i, tol in enumerate(value or []) for err in _check_toleration(i, tol)]
        raise_all(errors)
        return value

    def merged_with(self, override: "Workers | None") -> "Workers":
        """These settings with a pool's override applied, every unset field filled.

        nodeSelector, podLabels and resources merge key by key (a pool usually adds one GPU
        label to a shared selector); image, shmSize and tolerations are replaced as a whole
        because a half-merged toleration list is never what anyone means.
        """
        over = override or Workers()
        base_res = self.resources or WorkerResources()
        over_res = over.resources or WorkerResources()
        # Not validated again: both sides were, and the merged maps may hold more than
        # MAX_LABELS entries, a bound that only exists for the cost of the CRD's rules.
        return Workers.model_construct(
            image=over.image if over.image is not None else self.image,
            node_selector={**(self.node_selector or {}), **(over.node_selector or {})},
            pod_labels={**(self.pod_labels or {}), **(over.pod_labels or {})},
            tolerations=list(
                over.tolerations if over.tolerations is not None else self.tolerations or []
            ),
            resources=WorkerResources(
                cpu=over_res.cpu if over_res.cpu is not None else base_res.cpu,
                memory=over_res.memory if over_res.memory is not None else base_res.memory,
            ),
            shm_size=over.shm_size if over.shm_size is not None else self.shm_size,
        )
