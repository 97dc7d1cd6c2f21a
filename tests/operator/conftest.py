"""Fixtures of the operator tests: the in-process API server (r1serve_testing.fake_api), schema and CEL checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import pytest_asyncio
import yaml
from r1serve_testing.fake_api import (
    OperatorProcess,
    OperatorThread,
    api_server,
    eventually,
    write_kubeconfig,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
R1D = "r1serve.io/v1alpha1/r1deployments"
RAYSERVICES = "ray.io/v1/rayservices"
RAYCLUSTERS = "ray.io/v1/rayclusters"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


@pytest.fixture
def point_kubeconfig(tmp_path, monkeypatch):
    """Returns a function that points the kubernetes client (and kopf) at a server URL."""
    def point(url: str) -> None:
        path = tmp_path / "kubeconfig"
        write_kubeconfig(path, url.rstrip("/"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(path))
        # kubernetes.config reads $KUBECONFIG once, at import.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return point


@pytest_asyncio.fixture
async def kube(point_kubeconfig):
    async with api_server() as server:
        point_kubeconfig(str(server.url))
        yield server


@pytest_asyncio.fixture
async def kube_without_kuberay(point_kubeconfig):
    async with api_server(kuberay=False) as server:
        point_kubeconfig(str(server.url))
        yield server


@pytest.fixture
def wait_for():
    """`await wait_for(check, timeout=..., message=...)`: poll a condition, never a bare sleep."""
    return eventually


@pytest.fixture
def operator_thread():
    """`async with operator_thread(*argv):` runs the operator for the block."""
    return OperatorThread


@pytest_asyncio.fixture
async def operator_process(kube, tmp_path):
    """`await operator_process(*argv).start()`: the operator as a child process that a test can
    kill (SIGKILL); whatever still runs at the end is killed."""
    started: list[OperatorProcess] = []

    def make(*argv: str) -> OperatorProcess:
        started.append(OperatorProcess(kube, tmp_path, *argv))
        return started[-1]

    yield make
    for process in started:
        await process.kill()


# --- Custom resources without an API server: OpenAPI -> JSON Schema, defaulting, CEL rules.

_IGNORED_EXTENSIONS = {"x-kubernetes-validations", "x-kubernetes-list-type",
                       "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "nullable",
                       "x-kubernetes-embedded-resource", "x-kubernetes-preserve-unknown-fields",
                       "x-kubernetes-int-or-string", "format"}


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema, unknown fields rejected (kubectl's strict field
    validation) except where the schema preserves them."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _IGNORED_EXTENSIONS:
            continue
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(prop) for name, prop in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(option) for option in value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if value:
                out[key] = node[bound]
        else:
            out[key] = value
    if out.get("exclusiveMinimum") is not None:
        out.pop("minimum", None)
    if out.get("exclusiveMaximum") is not None:
        out.pop("maximum", None)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
    open_ended = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-embedded-resource")
    if "properties" in node and "additionalProperties" not in node and not open_ended:
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: dict, obj: Any) -> Any:
    """Structural defaulting as the API server does it, in place; returns obj."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj and obj[name] is not None:
                apply_defaults(prop, obj[name])
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            apply_defaults(schema["items"], item)
    return obj


def cel_violations(schema: dict, obj: Any, path: str = "") -> list[str]:
    """Every failing x-kubernetes-validations rule as '<path><fieldPath>: <message>'."""
    import celpy

    found: list[str] = []
    if obj is None:
        return found
    for rule in schema.get("x-kubernetes-validations") or []:
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        try:
            ok = program.evaluate({"self": celpy.json_to_cel(obj)})
        except celpy.CELEvalError as exc:
            ok = exc
        # A rule that errors at run time (no such key, ...) rejects the object too.
        if isinstance(ok, celpy.CELEvalError) or not bool(ok):
            found.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(obj, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in obj:
                found += cel_violations(prop, obj[name], f"{path}.{name}")
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            found += cel_violations(schema["items"], item, f"{path}[{index}]")
    return found


class CustomResourceValidator:
    """Validates objects of one CRD version the way the API server would."""

    def __init__(self, crd: dict, version: str) -> None:
        import jsonschema

        [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
        self.schema = served["schema"]["openAPIV3Schema"]
        converted = openapi_to_jsonschema(self.schema)
        # The root metadata is an ObjectMeta whatever the CRD declares of it (a CRD may only
        # constrain name and generateName): its other fields are never unknown.
        converted.get("properties", {}).get("metadata", {}).pop("additionalProperties", None)
        self.validator = jsonschema.Draft202012Validator(converted)

    def schema_errors(self, obj: dict) -> list[str]:
        """Errors with paths as the API server writes them: a missing or unknown property is
        named by its own path (`spec.decode: Required value`, `unknown field "spec.x"`)."""
        found = []
        for error in self.validator.iter_errors(obj):
            where = ".".join(str(p) for p in error.absolute_path)
            prefix = f"{where}." if where else ""
            if error.validator == "required":
                missing = [name for name in error.validator_value if name not in error.instance]
                found += [f"{prefix}{name}: Required value" for name in missing]
            elif error.validator == "additionalProperties":
                known = error.schema.get("properties", {})
                found += [f'unknown field "{prefix}{name}"' for name in error.instance
                          if name not in known]
            else:
                found.append(f"{where}: {error.message}")
        return found

    def defaulted(self, obj: dict) -> dict:
        return apply_defaults(self.schema, copy.deepcopy(obj))

    def errors(self, obj: dict) -> list[str]:
        """Schema errors, else CEL violations of the defaulted object (the server's order). CEL sees a
        null-valued (nullable) field as absent, as the API server's does: has() is false for it."""
        defaulted = self.defaulted(obj)
        return self.schema_errors(defaulted) or cel_violations(self.schema, _without_nulls(defaulted))


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@pytest.fixture(scope="session")
def kuberay_rayservice():
    """A validator for ray.io/v1 RayService, from KubeRay 1.7's own CRD."""
    crd = yaml.safe_load((ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml").read_text())
    return CustomResourceValidator(crd, "v1")


@pytest.fixture(scope="session")
def r1d_crd():
    from r1serve.spec.crd import build_crd

    return build_crd()


@pytest.fixture(scope="session")
def r1d_validator(r1d_crd):
    return CustomResourceValidator(r1d_crd, "v1alpha1")


def make_rayservice_status(app: str | None = "RUNNING", *, pending: bool = False,
                           deployments: dict[str, str] | None = None, cluster: str = "r1-abcde",
                           ready: bool = True, upgrading: bool = False, endpoints: int = 1,
                           message: str = "") -> dict:
    """A RayService `status` as KubeRay 1.7 writes it, for tests that play KubeRay."""
    if app is None:
        return {}
    statuses = {name: {"status": state} for name, state in (deployments or {
        "Ingress": "HEALTHY", "PrefillServer": "HEALTHY", "DecodeServer": "HEALTHY"}).items()}
    service = {"rayClusterName": cluster, "applicationStatuses": {"r1serve": {
        "status": app, "message": message, "serveDeploymentStatuses": statuses}}}
    conditions = [{"type": "Ready", "status": "True" if ready else "False",
                   "reason": "NonZeroServeEndpoints" if ready else "Initializing",
                   "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    if upgrading:
        conditions.append({"type": "UpgradeInProgress", "status": "True", "reason": "Upgrading",
                           "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    return {"pendingServiceStatus" if pending else "activeServiceStatus": service,
            "conditions": conditions, "numServeEndpoints": endpoints}


def make_pods(cluster: str, group: str, count: int, ready: int) -> list[dict]:
    """Worker pods of one KubeRay worker group, `ready` of them Ready."""
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{cluster}-{group}-{i}", "namespace": "default",
                          "labels": {"ray.io/cluster": cluster, "ray.io/group": group}},
             "spec": {"containers": [{"name": "ray-worker", "image": "i:1"}]},
             "status": {"conditions": [{"type": "Ready",
                                        "status": "True" if i < ready else "False"}]}}
            for i in range(count)]


@pytest.fixture
def kuberay_world():
    """Builders of what KubeRay writes: RayService status and Ray pods."""
    return type("KubeRayWorld", (), {"status": staticmethod(make_rayservice_status),
                                     "pods": staticmethod(make_pods)})
