"""Fixtures of the tests that run against a real Kubernetes API server (see control_plane.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from .control_plane import HOW_TO_GET, ControlPlane, assets

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_ENV = "R1SERVE_REQUIRE_CONTROL_PLANE"
KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay"
FIELD_MANAGER = "r1serve-tests"
MANIFESTS = ROOT / "manifests"
# The order docs/KUBERNETES.md gives (`kubectl apply -f crd.yaml -f rbac.yaml -f operator.yaml`).
DOCUMENTED = ("crd.yaml", "rbac.yaml", "operator.yaml")


def eventually(check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.2,
               message: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail naming `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message} (last: {last!r})")


class Cluster:
    """A running control plane and admin clients for it."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.api = plane.client()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.extensions = kubernetes.client.ApiextensionsV1Api(self.api)
        self._namespaces = 0

    @property
    def has_controller_manager(self) -> bool:
        return self.plane.with_controller_manager

    def dynamic(self) -> DynamicClient:
        """A fresh discovery client (CRDs created since the last one are found)."""
        return DynamicClient(self.api)

    def apply(self, obj: dict[str, Any], *, dry_run: bool = False,
              client: DynamicClient | None = None) -> dict[str, Any]:
        """Server-side apply, as `kubectl apply --server-side` sends it."""
        client = client or self.dynamic()
        resource = client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        kwargs = {"dry_run": "All"} if dry_run else {}
        return client.server_side_apply(
            resource, body=obj, name=meta["name"], namespace=meta.get("namespace"),
            field_manager=FIELD_MANAGER, force_conflicts=True, **kwargs).to_dict()

    def apply_files(self, *paths: Path) -> list[dict[str, Any]]:
        """Every document of every file, in the order `kubectl apply -f a -f b` sends them."""
        client = self.dynamic()
        applied = []
        for path in paths:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    if doc["kind"] == "CustomResourceDefinition":
                        applied.append(self.apply(doc, client=client))
                        self.wait_established(doc["metadata"]["name"])
                        client = self.dynamic()
                    else:
                        applied.append(self.apply(doc, client=client))
        return applied

    def wait_established(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        def established():
            crd = self.api.sanitize_for_serialization(
                self.extensions.read_custom_resource_definition(name))
            conditions = (crd.get("status") or {}).get("conditions") or []
            return crd if any(c["type"] == "Established" and c["status"] == "True"
                              for c in conditions) else None
        return eventually(established, timeout=timeout, message=f"CRD {name} to be Established")

    def install_crd(self, path: Path) -> dict[str, Any]:
        crd = yaml.safe_load(path.read_text())
        self.apply(crd)
        return self.wait_established(crd["metadata"]["name"])

    def pod_refusal(self, namespace: str, name: str, template: dict[str, Any]) -> str | None:
        """A server dry run of creating a Pod from a pod template: None when the server (its
        validation and admission, Pod Security included) would create it, else its refusal."""
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": (template.get("metadata") or {}).get("labels", {})},
               "spec": template["spec"]}
        try:
            self.core.create_namespaced_pod(namespace, pod, dry_run="All")
        except ApiException as exc:
            return refusal(exc)
        return None

    def new_namespace(self, prefix: str = "t", labels: dict[str, str] | None = None) -> str:
        """A namespace of its own for one test (the control plane is shared by the session)."""
        self._namespaces += 1
        name = f"{prefix}-{self._namespaces}"
        self.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        # Pods name the namespace's "default" ServiceAccount, which the controller manager creates
        # a moment later (or never, without it): create it now, whoever wins.
        try:
            self.core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        return name


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager, started once for the tests that ask."""
    binaries = assets()
    if binaries is None:
        message = f"no Kubernetes control plane binaries: {HOW_TO_GET}"
        # CI found the binaries and says so: a skip there would hide a broken extraction.
        if os.environ.get(REQUIRED_ENV) == "1":
            pytest.fail(f"{REQUIRED_ENV}=1 but {message}")
        pytest.skip(message)
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), binaries).start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def cluster(control_plane) -> Iterator[Cluster]:
    world = Cluster(control_plane)
    yield world
    world.api.close()


@pytest.fixture(scope="session")
def r1d_installed(cluster) -> dict[str, Any]:
    """The R1Deployment CRD of manifests/, created and Established."""
    return cluster.install_crd(ROOT / "manifests" / "crd.yaml")


@pytest.fixture(scope="session")
def kuberay_installed(cluster) -> None:
    """KubeRay 1.7's RayCluster and RayService CRDs (no KubeRay controller runs)."""
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayservices.yaml"):
        cluster.install_crd(KUBERAY_CRDS / name)


@pytest.fixture(scope="session")
def operator_install(cluster) -> dict[str, Any]:
    """manifests/ applied in the documented order; `fresh` says the namespace did not exist before."""
    from r1serve.operator.manifests import NAMESPACE

    try:
        cluster.core.read_namespace(NAMESPACE)
        fresh = False
    except ApiException as exc:
        if exc.status != 404:
            raise
        fresh = True
    applied = cluster.apply_files(*(MANIFESTS / name for name in DOCUMENTED))
    return {"fresh": fresh, "applied": applied}


def refusal(exc: ApiException) -> str:
    """The server's message of a refused request, or the whole body."""
    import json

    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body)
