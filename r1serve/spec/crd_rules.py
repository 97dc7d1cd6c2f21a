"""The validation the API server runs on an R1Deployment: OpenAPI patterns and CEL rules mirroring the
pydantic validators, attached to the generated schema by r1serve.spec.crd."""

from typing import Any

from r1serve.spec import constants as C
from r1serve.spec import quantity
from r1serve.spec.base import (
    DNS_1035_LABEL_PATTERN,
    DNS_1123_SUBDOMAIN_PATTERN,
    ENV_NAME_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_KEY_RULE,
    LABEL_PREFIX_LENGTH_PATTERN,
    LABEL_VALUE_PATTERN,
    MAX_NAME_LENGTH,
)
from r1serve.spec.sections import (
    CUDA_IPC_LOCAL_ONLY,
    FP8_NEEDS_GPUS,
    GLOO_NEEDS_CPU_POOLS,
    NCCL_REFUSED,
    NORMAL_ABSOLUTE_PATTERN,
    PRESET_PATTERN,
    RESERVED_MOUNT_PATHS,
    RESERVED_PORTS,
    TINY_PREFIX,
)
from r1serve.spec.upgrade import INCREMENTAL
from r1serve.spec.workers import RESERVED_LABELS

# The regular expressions are the spec's own, anchored (OpenAPI patterns are unanchored).


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


def _rule(rule: str, message: str, field_path: str | None = None,
          reason: str | None = None) -> dict[str, Any]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


_QUANTITY_FIELD = {"x-kubernetes-int-or-string": True, "pattern": _anchored(quantity.PATTERN.pattern)}
_OBJECT_NAME = {"pattern": _anchored(DNS_1123_SUBDOMAIN_PATTERN.pattern), "maxLength": 253}
_NON_BLANK = {"pattern": r"^\S+$"}
_RESERVED = ", ".join(f"{port} ({what})" for port, what in sorted(RESERVED_PORTS.items()))
_PORT_RULES = [_rule(f"!(self in {sorted(RESERVED_PORTS)})",
                     f"must not be one of the reserved ports: {_RESERVED}")]
_ABSOLUTE_PATH = {"pattern": r"^/\S*$"}


def _is_label_key(var: str) -> str:
    return (f"{var}.matches('{_anchored(LABEL_KEY_PATTERN.pattern)}') && "
            f"{var}.matches('{_anchored(LABEL_PREFIX_LENGTH_PATTERN.pattern)}')")


# Longest key the label-key rule allows: it bounds the CEL cost of matching a toleration key.
_MAX_LABEL_KEY_LENGTH = 253 + 1 + 63
_LABEL_VALUE_FIELD = {"type": "string", "maxLength": 63,
                      "pattern": _anchored(LABEL_VALUE_PATTERN.pattern)}


def _got(rule: dict[str, Any], value: str) -> dict[str, Any]:
    """The rule with a message expression that appends the offending value, as the spec's errors
    do (the server's message for a failing rule names the field but not its value)."""
    return {**rule, "messageExpression": f'"{rule["message"]} (got " + {value} + ")"'}


def _quoted(value: str) -> str:
    return f"\"'\" + {value} + \"'\""


def _no_key(broken: str, rule: str, problem: str) -> dict[str, Any]:
    """A rule no key of a map may break, its message naming the first key that does."""
    return {**_got(_rule(f"!self.exists(k, {broken})", f"key {problem}"),
                   _quoted(f"self.filter(k, {broken})[0]")), "message": f"every key {rule}"}


_LABEL_KEYS_RULE = _no_key(f"!({_is_label_key('k')})", LABEL_KEY_RULE, LABEL_KEY_RULE)
_LABEL_MAP = {"additionalProperties": _LABEL_VALUE_FIELD,
              "x-kubernetes-validations": [_LABEL_KEYS_RULE]}
_RESERVED_KEY = " || ".join([f"k in {list(C.RESERVED_POD_LABELS)}", *(
    f"k.startsWith('{prefix}')" for prefix in C.RESERVED_POD_LABEL_PREFIXES)])
_POD_LABELS = {**_LABEL_MAP, "x-kubernetes-validations": [_LABEL_KEYS_RULE, _no_key(
    _RESERVED_KEY, f"must not be reserved for r1serve and KubeRay ({RESERVED_LABELS})",
    f"is reserved for r1serve and KubeRay ({RESERVED_LABELS})")]}
_TOLERATIONS = {"items": {
    "type": "object",
    "description": "A Kubernetes toleration.",
    "properties": {
        "key": {"type": "string", "maxLength": _MAX_LABEL_KEY_LENGTH,
                "description": "Taint key; empty with Exists matches all."},
        "operator": {"type": "string", "enum": ["Exists", "Equal"],
                     "description": "Exists or Equal (default)."},
        "value": {**_LABEL_VALUE_FIELD, "description": "Taint value for Equal."},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"],
                   "description": "Taint effect to tolerate; empty matches all."},
        "tolerationSeconds": {"type": "integer", "format": "int64",
                              "description": "How long a NoExecute taint is tolerated."},
    },
    # Kubernetes checks these only when it creates a pod, long after the resource was accepted.
    "x-kubernetes-validations": [
        _got(_rule(f"!has(self.key) || self.key == '' || ({_is_label_key('self.key')})",
                   f"tolerations: key {LABEL_KEY_RULE}", ".key"), _quoted("self.key")),
        _rule("(has(self.key) && self.key != '') || "
              "(has(self.operator) && self.operator == 'Exists')",
              "tolerations: key is required unless operator is Exists (an empty key with Exists "
              "tolerates every taint)", ".key"),
        _got(_rule("!has(self.value) || self.value == '' || !has(self.operator) || "
                   "self.operator != 'Exists'",
                   "tolerations: value must be empty when operator is Exists", ".value"),
             _quoted("self.value")),
        _rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
              "tolerations: tolerationSeconds needs effect: NoExecute (only a NoExecute taint "
              "evicts a pod, after this many seconds)", ".tolerationSeconds"),
    ],
}}
_POWERS_OF_TWO = [2**n for n in range(4, 11)]
# The spec's path checks: [.] instead of \\. keeps the regular expressions free of escapes.
_DOT_SEGMENT, _PARENT_SEGMENT = "(^|/)[.][.]?(/|$)", "(^|/)[.][.](/|$)"
_NORMAL_PATH = {"pattern": _anchored(NORMAL_ABSOLUTE_PATTERN.pattern), "x-kubernetes-validations": [
    _rule(f"!self.matches('{_DOT_SEGMENT}')", "must be an absolute path without '.', '..' or "
          "empty segments and without a trailing '/'")]}
_MOUNT_PATH = {**_NORMAL_PATH, "x-kubernetes-validations": [
    *_NORMAL_PATH["x-kubernetes-validations"],
    _rule(f"!(self in {sorted(RESERVED_MOUNT_PATHS)})", "must not be where r1serve mounts "
          + " or ".join(f"{what} ({path})" for path, what in sorted(RESERVED_MOUNT_PATHS.items())))]}
_RELATIVE_PATH = {"pattern": r"^[^/\s]\S*$", "x-kubernetes-validations": [
    _rule(f"!self.matches('{_PARENT_SEGMENT}')", "must be a relative path without '..' segments")]}

# (model, field) -> schema keys added to that field.
FIELD_OVERRIDES: dict[tuple[str | None, str | None], dict[str, Any]] = {
    ("ApiSpec", "grpcPort"): {"x-kubernetes-validations": _PORT_RULES},
    ("ApiSpec", "httpPort"): {"x-kubernetes-validations": _PORT_RULES},
    ("ApiAuth", "secretName"): _OBJECT_NAME,
    ("ApiAuth", "tokenFile"): _NON_BLANK,
    ("ApiAuth", "tokenEnv"): {"pattern": _anchored(ENV_NAME_PATTERN.pattern)},
    ("ApiTLS", "secretName"): _OBJECT_NAME,
    ("ApiTLS", "certFile"): _ABSOLUTE_PATH,
    ("ApiTLS", "keyFile"): _ABSOLUTE_PATH,
    ("ModelSpec", "servedModelName"): _NON_BLANK,
    ("ModelVolume", "claimName"): _OBJECT_NAME,
    ("ModelVolume", "hostPath"): _NORMAL_PATH,
    ("ModelVolume", "mountPath"): _MOUNT_PATH,
    ("ModelVolume", "subPath"): _RELATIVE_PATH,
    ("NfsVolume", "server"): _NON_BLANK,
    ("NfsVolume", "path"): _ABSOLUTE_PATH,
    ("ModelSpec", "source"): {"x-kubernetes-validations": [
        _rule("!self.contains('://')",
              "must be a path on a mounted volume or 'tiny:<preset>'; URLs are not downloaded"),
        _rule(f"!self.startsWith('{TINY_PREFIX}') || "
              f"self.matches('^{TINY_PREFIX}({PRESET_PATTERN.pattern})?$')",
              "tiny preset must be lowercase letters, digits, '.', '_' or '-'"),
    ]},
    ("PrefillPool", "blockSize"): {"x-kubernetes-validations": [
        _rule(f"self in {_POWERS_OF_TWO}", "must be a power of two from 16 to 1024")]},
    ("DecodePool", "blockSize"): {"x-kubernetes-validations": [
        _rule(f"self in {_POWERS_OF_TWO}", "must be a power of two from 16 to 1024")]},
    ("WorkerResources", "cpu"): _QUANTITY_FIELD,
    ("WorkerResources", "memory"): _QUANTITY_FIELD,
    ("Workers", "shmSize"): _QUANTITY_FIELD,
    ("Workers", "image"): _NON_BLANK,
    ("Workers", "tolerations"): _TOLERATIONS,
    ("ClusterUpgradeOptions", "gatewayClassName"): _OBJECT_NAME,
    ("Workers", "nodeSelector"): _LABEL_MAP,
    ("Workers", "podLabels"): _POD_LABELS,
}


def _divisible(pool: str) -> dict[str, Any]:
    guard = f"!has(self.model.numRoutedExperts) || !has(self.{pool})"
    total = "(self.model.numRoutedExperts + self.experts.redundant)"
    return _rule(f"{guard} || {total} % self.{pool}.expertParallel == 0",
                 f"{pool}.expertParallel must divide model.numRoutedExperts + "
                 "experts.redundant: the routed experts and their redundant copies are split "
                 "evenly across the ranks", f".{pool}.expertParallel")


def _kv_cache_fits(pool: str) -> dict[str, Any]:
    return _rule(f"!has(self.{pool}) || !has(self.{pool}.kvCacheBlocks) || "
                 f"self.{pool}.kvCacheBlocks * self.{pool}.blockSize >= self.model.maxModelLen",
                 f"{pool}.kvCacheBlocks x {pool}.blockSize must hold one model.maxModelLen "
                 "sequence", f".{pool}.kvCacheBlocks")


_VOLUME_SOURCES = " + ".join(f"(has(self.{field}) ? 1 : 0)"
                             for field in ("claimName", "hostPath", "nfs"))
_UNDER_MOUNT = ("(self.source == self.volume.mountPath || "
                "self.source.startsWith(self.volume.mountPath + '/')) && "
                f"!self.source.matches('{_PARENT_SEGMENT}')")

_DECODE_MIN = "double(self.decode.replicas.min > 0 ? self.decode.replicas.min : 1)"

_GPUS_FILL_A_NODE = _rule("self.gpusPerRank == 0 || self.gpusPerNode % self.gpusPerRank == 0",
                          "gpusPerNode must be a multiple of gpusPerRank", ".gpusPerNode")
_TRITON_NEEDS_GPUS = _rule("self.kernels != 'triton' || self.gpusPerRank > 0",
                           "kernels: triton needs GPUs (gpusPerRank > 0); use auto or torch on CPU", ".kernels")
# CRD model name -> CEL rules on that object (self is the object).
MODEL_RULES: dict[str, list[dict[str, Any]]] = {
    "Replicas": [
        _rule("self.min <= self.max", "replicas.min must be <= replicas.max", ".min"),
        _rule("!has(self.initial) || (self.min <= self.initial && self.initial <= self.max)",
              "replicas.initial must be between replicas.min and replicas.max", ".initial"),
    ],
    "ModelSpec": [
        _rule(f"!has(self.volume) || !self.source.startsWith('{TINY_PREFIX}')",
              "model.volume must be omitted with a 'tiny:' source: tiny checkpoints are "
              "generated in the pods, not read from a volume", ".volume"),
        _rule(f"!has(self.volume) || self.source.startsWith('{TINY_PREFIX}') || ({_UNDER_MOUNT})",
              "model.source must be an absolute path under model.volume.mountPath when "
              "model.volume is set", ".source"),
    ],
    "ModelVolume": [
        _rule(f"{_VOLUME_SOURCES} >= 1", "model.volume: set one of claimName, hostPath or nfs"),
        _rule(f"{_VOLUME_SOURCES} <= 1",
              "model.volume: set only one of claimName, hostPath or nfs"),
    ],
    "Ratio": [_rule("double(self.min) <= double(self.max)", "ratio.min must be <= ratio.max",
                    ".min")],
    "ApiSpec": [_rule("self.grpcPort != self.httpPort", "api.httpPort must differ from "
                      "api.grpcPort", ".httpPort")],
    "ApiAuth": [_rule("has(self.secretName) || has(self.tokenFile) || has(self.tokenEnv)",
                      "api.auth: set at least one of secretName, tokenFile or tokenEnv")],
    "ApiTLS": [
        _rule("has(self.secretName) || has(self.certFile) || has(self.keyFile)",
              "api.tls: set secretName, or certFile and keyFile"),
        _rule("!has(self.secretName) || !(has(self.certFile) || has(self.keyFile))",
              "api.tls: set either secretName or certFile and keyFile, not both", ".secretName"),
        _rule("has(self.certFile) || !has(self.keyFile)", "api.tls.certFile is required with "
              "keyFile", ".certFile", "FieldValueRequired"),
        _rule("has(self.keyFile) || !has(self.certFile)", "api.tls.keyFile is required with "
              "certFile", ".keyFile", "FieldValueRequired"),
    ],
    "Upgrade": [
        _rule(f"self.strategy != '{INCREMENTAL}' || has(self.clusterUpgradeOptions)",
              f"upgrade.clusterUpgradeOptions is required when upgrade.strategy is {INCREMENTAL} "
              "(gatewayClassName, stepSizePercent, intervalSeconds)", ".clusterUpgradeOptions",
              "FieldValueRequired"),
        _rule(f"self.strategy == '{INCREMENTAL}' || !has(self.clusterUpgradeOptions)",
              f"upgrade.clusterUpgradeOptions is only allowed with upgrade.strategy {INCREMENTAL}",
              ".clusterUpgradeOptions"),
    ],
    "ClusterUpgradeOptions": [
        _rule("self.stepSizePercent <= self.maxSurgePercent",
              "upgrade.clusterUpgradeOptions.stepSizePercent must be <= maxSurgePercent",
              ".stepSizePercent")],
    "PrefillPool": [_GPUS_FILL_A_NODE, _TRITON_NEEDS_GPUS],
    "DecodePool": [_GPUS_FILL_A_NODE, _TRITON_NEEDS_GPUS, _rule(
        "self.autoscaling.targetOngoingRequests <= self.maxRunningRequests + "
        "self.maxQueuedRequests",
        "decode.autoscaling.targetOngoingRequests must be <= maxRunningRequests + "
        "maxQueuedRequests, otherwise the pool never scales up",
        ".autoscaling.targetOngoingRequests")],
    "R1DeploymentSpec": [
        _rule("has(self.prefill) || !self.disaggregation",
              "prefill is required when disaggregation is true; set disaggregation: false to "
              "let the decode pool prefill too", ".prefill", "FieldValueRequired"),
        _rule("self.disaggregation || !has(self.prefill)",
              "prefill must be omitted when disaggregation is false", ".prefill"),
        _rule("self.disaggregation || !has(self.ratio)",
              "ratio needs disaggregation: true", ".ratio"),
        _divisible("prefill"),
        _divisible("decode"),
        _kv_cache_fits("prefill"),
        _kv_cache_fits("decode"),
        _rule("self.kvTransfer.connector != 'nccl' || !self.disaggregation",
              f"kvTransfer.connector {NCCL_REFUSED}", ".kvTransfer.connector"),
        _rule("self.kvTransfer.connector != 'gloo' || (self.decode.gpusPerRank == 0 "
              "&& (!has(self.prefill) || self.prefill.gpusPerRank == 0))",
              f"kvTransfer.connector {GLOO_NEEDS_CPU_POOLS}", ".kvTransfer.connector"),
        # The CRD serves Kubernetes only, where pools never share a machine's GPU memory.
        _rule("self.kvTransfer.connector != 'cuda-ipc'",
              f"kvTransfer.connector {CUDA_IPC_LOCAL_ONLY}", ".kvTransfer.connector"),
        _rule("self.model.weights != 'fp8' || (self.decode.gpusPerRank > 0 "
              "&& (!has(self.prefill) || self.prefill.gpusPerRank > 0))",
              f"model.weights {FP8_NEEDS_GPUS}", ".model.weights"),
        _rule("!has(self.ratio) || !has(self.prefill) || double(self.ratio.min) <= "
              f"double(self.prefill.replicas.max) / {_DECODE_MIN}",
              "ratio.min is above the highest reachable ratio prefill.replicas.max / "
              "decode.replicas.min", ".ratio.min"),
        _rule("!has(self.ratio) || !has(self.prefill) || double(self.ratio.max) >= "
              "double(self.prefill.replicas.min) / double(self.decode.replicas.max)",
              "ratio.max is below the lowest reachable ratio prefill.replicas.min / "
              "decode.replicas.max", ".ratio.max"),
        _rule(f"self.upgrade.strategy != '{INCREMENTAL}' || !has(self.api.tls)",
              f"upgrade.strategy {INCREMENTAL} cannot be combined with api.tls: the Gateway "
              "KubeRay creates for it speaks plaintext HTTP to Serve's HTTP port, which api.tls "
              "makes TLS-only", ".upgrade.strategy"),
    ],
}

# A fieldPath must resolve inside the schema: the root `metadata` declares its `name` for that
# (the server refuses ".metadata.name" on a bare `metadata: {type: object}`).
ROOT_RULES = [
    _rule(f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
          f"metadata.name must be at most {MAX_NAME_LENGTH} characters so derived object names "
          "fit Kubernetes limits", ".metadata.name"),
    _rule(f"self.metadata.name.matches('{_anchored(DNS_1035_LABEL_PATTERN.pattern)}')",
          "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting "
          "with a letter)", ".metadata.name"),
]
