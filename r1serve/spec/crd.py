"""The R1Deployment CustomResourceDefinition, generated from the pydantic spec (`python -m r1serve.spec.crd`)."""

import sys
from typing import Any

import yaml

from r1serve.spec.crd_rules import FIELD_OVERRIDES, MODEL_RULES, ROOT_RULES
from r1serve.spec.model import GROUP, KIND, PLURAL, VERSION, R1Deployment

CRD_NAME = f"{PLURAL}.{GROUP}"
SHORT_NAMES = ["r1d"]
PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed")
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")

# Keys of pydantic's JSON schema that mean the same in a Kubernetes structural schema.
_KEPT = ("type", "description", "default", "minimum", "maximum", "enum", "pattern",
         "maxLength", "minLength", "maxItems", "minItems", "maxProperties", "format")


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
    if "const" in node:  # a Literal of one value: structural schemas have no `const`
        out["enum"] = [node["const"]]
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
            "kvConnector": {"type": "string", "description":
                            "How the pool's replicas hand prompts' KV caches over (kvTransfer.connector, "
                            "auto resolved where they run), as they report it."},
            "weights": {"type": "string", "description":
                        "How the pool's replicas hold the checkpoint's weights: fp8 or dequantized (model.weights, "
                        "auto resolved where they run), as they report it."},
            "degradedReplicas": {
                "type": "array",
                "description": "Replicas whose expert-parallel group lost ranks and serves on without them "
                               "(experts.onRankFailure: degrade); the Degraded condition says so too.",
                "items": {"type": "object", "description": "One degraded replica.", "properties": {
                    "replica": {"type": "string", "description": "The Serve replica's id."},
                    "ranksAlive": {"type": "integer", "description": "Ranks serving now."},
                    "ranks": {"type": "integer", "description": "Ranks the replica started with."},
                }},
            },
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
