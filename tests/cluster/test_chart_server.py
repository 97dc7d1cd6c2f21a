"""The Helm chart on a real API server: `helm install --create-namespace` objects accepted, and an operator
that watches one namespace with the chart's namespaced Role reconciles there."""

from __future__ import annotations

import helm_python as helm
import pytest
import yaml

from .conftest import ROOT, eventually
from .operator_process import Operator, service_account_token

CHART = ROOT / "charts" / "r1serve-operator"
RELEASE = "chart"

# Each runs the operator as a process against the real server: seconds, not milliseconds.
pytestmark = pytest.mark.slow


def _render(values: dict, namespace: str) -> list[dict]:
    rendered = helm.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=namespace)
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def _install(cluster, values: dict, namespace: str) -> list[dict]:
    """What `helm install --namespace NS --create-namespace` sends: the CRDs of crds/ first, then
    the templates, namespaced ones into NS."""
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        cluster.install_crd(crd)
    objects = _render(values, namespace)
    client = cluster.dynamic()
    for obj in objects:
        if obj["kind"] in ("Deployment", "ServiceAccount"):
            obj["metadata"].setdefault("namespace", namespace)
        cluster.apply(obj, client=client)
    return objects


@pytest.fixture(scope="module")
def watched(cluster) -> str:
    return cluster.new_namespace("watched")


@pytest.fixture(scope="module")
def chart_install(cluster, watched) -> tuple[str, list[dict]]:
    # The release namespace enforces "restricted": the chart's operator pod must meet it.
    namespace = cluster.new_namespace(
        "chart", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    return namespace, _install(cluster, {"watchNamespaces": [watched]}, namespace)


def test_the_chart_installs_and_its_operator_pod_meets_restricted(cluster, chart_install):
    namespace, objects = chart_install
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    assert cluster.pod_refusal(namespace, "operator-dry-run", template) is None
    assert {o["kind"] for o in objects} >= {"Deployment", "ServiceAccount", "Role", "RoleBinding",
                                             "ClusterRole", "ClusterRoleBinding"}


def test_an_operator_watching_one_namespace_reconciles_there_with_the_charts_roles(
        cluster, chart_install, watched, kuberay_installed, tmp_path):
    namespace, objects = chart_install
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = service_account_token(cluster, namespace, account)
    # The Deployment's own arguments (--namespace=<watched>), the health endpoint aside.
    argv = [arg for arg in container["args"] if not arg.startswith("--liveness")]
    assert argv == [f"--namespace={watched}"]
    operator = Operator(cluster.plane.token_kubeconfig(tmp_path / "kubeconfig", token), tmp_path,
                        *argv).start()
    try:
        doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
        doc["metadata"] = {"name": "tiny", "namespace": watched}
        cluster.custom.create_namespaced_custom_object("r1serve.io", "v1alpha1", watched,
                                                       "r1deployments", doc)

        def status():
            assert operator.alive(), operator.tail()
            live = cluster.custom.get_namespaced_custom_object(
                "r1serve.io", "v1alpha1", watched, "r1deployments", "tiny")
            return (live.get("status") or {}).get("rayService")
        assert eventually(status, timeout=60, message="the operator to reconcile") == "tiny"
        assert cluster.custom.get_namespaced_custom_object("ray.io", "v1", watched, "rayservices",
                                                           "tiny")
    finally:
        operator.stop()
    assert "403" not in operator.log.read_text(errors="replace"), operator.tail()
