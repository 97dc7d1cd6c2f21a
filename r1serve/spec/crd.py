"""The R1Deployment CustomResourceDefinition, generated from the pydantic spec (`python -m r1serve.spec.crd`)."""

import sys
from typing import Any

import yaml

from r1serve.spec import constants as C
from r1serve.spec.base import (
    _DNS_1035_LABEL,
    _DNS_1123_SUBDOMAIN,
    _ENV_NAME,
    _LABEL_KEY,
    _LABEL_PREFIX_LENGTH,
    _LABEL_VALUE,
    _QUANTITY,
    LABEL_KEY_RULE,
    MAX_NAME_LENGTH,
)
from r1serve.spec.model import GROUP, KIND, PLURAL, VERSION, R1Deployment
from r1serve.spec.sections import (
    _NORMAL_ABSOLUTE,
    _PRESET,
    RESERVED_MOUNT_PATHS,
    RESERVED_PORTS,
    TINY_PREFIX,
)
from r1serve.spec.upgrade import INCREMENTAL
from r1serve.spec.workers import RESERVED_LABELS

CRD_NAME = f"{PLURAL}.{GROUP}"
SHORT_NAMES = ["r1d"]
PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed")
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")

# Keys of pydantic's JSON schema that mean the same in a Kubernetes structural schema.
_KEPT = ("type", "description", "default", "minimum", "maximum", "enum", "pattern",
         "maxLength", "minLength", "maxItems", "minItems", "maxProperties", "format")


# --- Validation the API server runs: patterns and CEL rules mirroring the pydantic validators.
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


_QUANTITY_FIELD = {"x-kubernetes-int-or-string": True, "pattern": _anchored(_QUANTITY.pattern)}
_OBJECT_NAME = {"pattern": _anchored(_DNS_1123_SUBDOMAIN.pattern), "maxLength": 253}
_NON_BLANK = {"pattern": r"^\S+$"}
_RESERVED = ", ".join(f"{port} ({what})" for port, what in sorted(RESERVED_PORTS.items()))
_PORT_RULES = [_rule(f"!(self in {sorted(RESERVED_PORTS)})",
                     f"must not be one of the reserved ports: {_RESERVED}")]
_ABSOLUTE_PATH = {"pattern": r"^/\S*$"}


def _is_label_key(var: str) -> str:
    return (f"{var}.matches('{_anchored(_LABEL_KEY.pattern)}') && "
            f"{var}.matches('{_anchored(_LABEL_PREFIX_LENGTH.pattern)}')")


# Longest key the label-key rule allows: it bounds the CEL cost of matching a toleration key.
_MAX_LABEL_KEY_LENGTH = 253 + 1 + 63
_LABEL_VALUE_FIELD = {"type": "string", "maxLength": 63,
                      "pattern": _anchored(_LABEL_VALUE.pattern)}


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
_NORMAL_PATH = {"pattern": _anchored(_NORMAL_ABSOLUTE.pattern), "x-kubernetes-validations": [
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
    ("ApiAuth", "tokenEnv"): {"pattern": _anchored(_ENV_NAME.pattern)},
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
              f"self.matches('^{TINY_PREFIX}({_PRESET.pattern})?$')",
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
    "PrefillPool": [_GPUS_FILL_A_NODE],
    "DecodePool": [_GPUS_FILL_A_NODE, _rule(
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
        _rule("self.kvTransfer.connector != 'nccl' || !self.disaggregation || "
              "(self.decode.gpusPerRank > 0 && (!has(self.prefill) || self.prefill.gpusPerRank > 0))",
              "kvTransfer.connector nccl needs GPUs: prefill.gpusPerRank and "
              "decode.gpusPerRank must be >= 1", ".kvTransfer.connector"),
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
    _rule(f"self.metadata.name.matches('{_anchored(_DNS_1035_LABEL.pattern)}')",
          "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting "
          "with a letter)", ".metadata.name"),
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Follow a $ref; the referencing node's own keys (its field description) win."""
    if "$ref" not in node:
        return node, None
    name = node["$ref"].rsplit("/", 1)[-1]
    merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
    return merged, name


def _unwrap_optional(node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """anyOf [X, null] -> (X with the outer description/default, nullable)."""
    options = node.get("anyOf")
    if not options:
        return node, False
    real = [option for option in options if option.get("type") != "null"]
    if len(real) != 1 or len(real) == len(options):
        raise ValueError(f"cannot express {options!r} in a structural schema")
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    return {**real[0], **outer}, True


def _exclusive_bounds(node: dict[str, Any], out: dict[str, Any]) -> None:
    # JSON Schema 2020 writes `gt=0` as exclusiveMinimum: 0; OpenAPI v3.0 as a boolean flag.
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound not in node:
            continue
        if node.get("type") == "integer":
            out[flag] = node[bound] + (1 if flag == "minimum" else -1)
        else:
            out[flag] = node[bound]
            out[bound] = True


def _object_default(node: dict[str, Any]) -> dict[str, Any]:
    """The object the API server builds from its properties' defaults (each already filled in)."""
    return {name: prop["default"] for name, prop in node["properties"].items() if "default" in prop}


def _convert(node: dict[str, Any], defs: dict[str, Any], owner: str | None,
             field: str | None) -> dict[str, Any]:
    node, ref_name = _resolve(node, defs)
    node, nullable = _unwrap_optional(node)
    node, inner_ref = _resolve(node, defs)
    model = ref_name or inner_ref
    out = {key: node[key] for key in _KEPT if key in node}
    _exclusive_bounds(node, out)
    if nullable:
        out["nullable"] = True
        if out.get("default", 0) is None:
            del out["default"]
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {
            name: _convert(prop, defs, model, name) for name, prop in node["properties"].items()
        }
        for name, prop in out["properties"].items():
            # A sub-object built by a default_factory gets its nested defaults written out: the
            # API server checks the CEL rules against a `default` exactly as written, so a bare
            # `{}` would fail a rule such as `self.min <= self.max` ("no such key: min").
            if name not in node.get("required", []) and "default" not in prop \
                    and "properties" in prop and not prop.get("nullable"):
                prop["default"] = _object_default(prop)
        if node.get("required"):
            out["required"] = list(node["required"])
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], defs, None, None)
    if "items" in node:
        out["items"] = _convert(node["items"], defs, None, None)
    out.update(FIELD_OVERRIDES.get((owner, field), {}))
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)  # int-or-string fields carry no type in a structural schema
    if model in MODEL_RULES:
        out["x-kubernetes-validations"] = MODEL_RULES[model]
    return out


def spec_schema() -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `spec`, with CEL rules and defaults."""
    schema = R1Deployment.model_json_schema(by_alias=True, mode="validation")
    defs = schema["$defs"]
    return _convert(schema["properties"]["spec"], defs, "R1Deployment", "spec")


def _pool_status(role: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"Replicas (expert-parallel groups) of the {role} pool.",
        "properties": {
            "replicas": {"type": "integer", "format": "int32", "description":
                         "Replicas whose worker pods all exist."},
            "readyReplicas": {"type": "integer", "format": "int32", "description":
                              "Replicas whose pods are all ready while Serve reports the "
                              "pool's deployment healthy."},
            "desiredReplicas": {"type": "integer", "format": "int32", "description":
                                "Replicas the autoscaler currently wants (Ray Serve's target, "
                                "as the Ray autoscaler sized the worker group)."},
            "summary": {"type": "string", "description":
                        "readyReplicas/desiredReplicas, as `kubectl get` shows it."},
            "lastScaleDecision": _scale_decision(),
        },
    }


def _scale_decision() -> dict[str, Any]:
    text = {"type": "string"}
    return {"type": "object", "description": "The pool autoscaling policy's last change of the replica "
            "count, with its reason (signal value vs. target).", "properties": {
                "fromReplicas": {"type": "integer", "description": "Replicas when it decided."},
                "toReplicas": {"type": "integer", "description": "Replicas it asked for."},
                "signal": {**text, "description": "The signal that decided (e.g. queued prompt tokens)."},
                "value": {"type": "number", "description": "The signal summed over the pool's replicas."},
                "target": {"type": "number", "description": "The signal's target per replica."},
                "reason": {**text, "description": "Why, in words."},
                "time": {"type": "string", "format": "date-time", "description": "When it decided."},
            }}


def _condition() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object",
        "description": "A Kubernetes-style condition (metav1.Condition).",
        "required": ["type", "status"],
        "properties": {
            "type": {**text, "description": "Ready, Progressing or Degraded."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"],
                       "description": "True, False or Unknown."},
            "reason": {**text, "description": "CamelCase reason for the last transition."},
            "message": {**text, "description": "Human-readable details."},
            "lastTransitionTime": {"type": "string", "format": "date-time",
                                   "description": "When the status last changed."},
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "metadata.generation the condition is for."},
        },
    }


def status_schema() -> dict[str, Any]:
    """The schema of `status`, written only by the operator."""
    return {
        "type": "object",
        "description": "Observed state, written by the r1serve operator.",
        "properties": {
            "observedGeneration": {"type": "integer", "format": "int64", "description":
                                   "The metadata.generation this status describes."},
            "phase": {"type": "string", "enum": list(PHASES), "description":
                      "Pending (cluster starting), Progressing (deploying or rolling out), "
                      "Ready (serving), Degraded (serving with unhealthy parts) or Failed."},
            "conditions": {"type": "array", "items": _condition(),
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                           "description": "Ready, Progressing and Degraded conditions."},
            "prefill": _pool_status("prefill"),
            "decode": _pool_status("decode"),
            "endpoints": {"type": "object", "description": "Where clients connect.", "properties": {
                "grpc": {"type": "string", "description": "host:port of the gRPC endpoint."},
                "http": {"type": "string", "description": "URL of the OpenAI-compatible API."},
            }},
            "rayService": {"type": "string", "description": "Name of the owned KubeRay RayService."},
            "lastScaleDecision": {"type": "object", "description":
                                  "The latest change of a pool's desired replicas.", "properties": {
                "pool": {"type": "string", "enum": ["prefill", "decode"],
                         "description": "The pool that scaled."},
                "fromReplicas": {"type": "integer", "description": "Desired replicas before."},
                "toReplicas": {"type": "integer", "description": "Desired replicas after."},
                "time": {"type": "string", "format": "date-time",
                         "description": "When the operator observed it."},
            }},
        },
    }


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.summary",
         "description": "Ready/desired prefill replicas."},
        {"name": "Decode", "type": "string", "jsonPath": ".status.decode.summary",
         "description": "Ready/desired decode replicas."},
        {"name": "gRPC", "type": "string", "jsonPath": ".status.endpoints.grpc", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object of R1Deployment."""
    root = {
        "type": "object",
        "description": "A DeepSeek-R1-class MoE model served by Ray Serve on KubeRay: prefill "
        "and decode pools of expert-parallel replicas, autoscaled on queue depth.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "Always r1serve.io/v1alpha1."},
            "kind": {"type": "string", "description": "Always R1Deployment."},
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": ROOT_RULES,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "r1serve"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": KIND.lower(), "shortNames": SHORT_NAMES,
                      "categories": ["r1serve"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {"status": {}},
                "additionalPrinterColumns": _printer_columns(),
            }],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-objects (the same rule list on two fields) out in full: kubectl and
    the API server accept anchors, but readers of the generated file should not need them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: Any) -> str:
    """Deterministic, alias-free YAML of a generated manifest (key order as built)."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, width=100)


def crd_yaml() -> str:
    """build_crd() as the YAML committed in manifests/crd.yaml."""
    header = "# Generated by `python -m r1serve.operator.manifests` from r1serve/spec; do not edit.\n"
    return header + to_yaml(build_crd())


if __name__ == "__main__":
    sys.stdout.write(crd_yaml())
