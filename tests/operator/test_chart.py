"""The Helm chart and the generated manifests: they render, validate, and never drift from the code."""

import json
import shutil
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from r1serve.operator.manifests import (
    REGENERATE,
    build_operator,
    build_rbac,
    cluster_rules,
    generated_files,
    main,
    namespaced_rules,
    operator_container,
    stale_files,
)
from r1serve.spec.crd import crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "r1serve-operator"
KUBE_VERSION = "1.33.0"


def _render(values=None, namespace="r1serve-system") -> list[dict]:
    rendered = helm.Chart.load(str(CHART)).render(values or {}, name="r1serve",
                                                  namespace=namespace)
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def _notes(values=None) -> str:
    rendered = helm.Chart.load(str(CHART)).render(values or {}, name="r1serve",
                                                  namespace="r1serve-system")
    return rendered["r1serve-operator/templates/NOTES.txt"]


def _by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def _rules_key(rules):
    return sorted(json.dumps(rule, sort_keys=True) for rule in rules)


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["ml", "prod"], "verbose": True,
                                         "rayPods": {"defaultImage": "my/ray:2.60.0"}}],
                         ids=["cluster-wide", "namespaced"])
def test_chart_renders_objects_that_validate(values):
    objects = _render(values)
    assert {o["kind"] for o in objects} >= {"Deployment", "ServiceAccount", "ClusterRole",
                                            "ClusterRoleBinding"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_cluster_wide_rbac_is_the_generated_least_privilege():
    objects = _render()
    [role] = _by_kind(objects, "ClusterRole")
    assert _rules_key(role["rules"]) == _rules_key(namespaced_rules() + cluster_rules())
    assert _by_kind(objects, "Role") == []
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert "delete" not in verbs and "*" not in verbs


def test_namespaced_mode_uses_roles():
    objects = _render({"watchNamespaces": ["ml", "prod"]})
    [cluster_role] = _by_kind(objects, "ClusterRole")
    assert _rules_key(cluster_role["rules"]) == _rules_key(cluster_rules())
    roles = _by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "prod"]
    assert all(_rules_key(r["rules"]) == _rules_key(namespaced_rules()) for r in roles)
    assert len(_by_kind(objects, "RoleBinding")) == 2
    [deployment] = _by_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--namespace=ml", "--namespace=prod"]


def test_operator_pod_is_locked_down_and_probed():
    [deployment] = _by_kind(_render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    expected = operator_container("ghcr.io/r1serve/r1serve:0.1.0")
    for key in ("image", "command", "ports", "livenessProbe", "readinessProbe",
                "securityContext", "volumeMounts", "resources"):
        assert container[key] == expected[key], key
    assert container["args"] == expected["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["R1SERVE_RANK_MEMORY"] == "8Gi" and "R1SERVE_DEFAULT_IMAGE" not in env


def test_chart_carries_the_crd_and_declares_kuberay():
    chart = helm.Chart.load(str(CHART))
    [crd] = chart.crds
    assert crd["data"] == crd_yaml()
    assert [(d["name"], d["version"]) for d in chart.metadata["dependencies"]] == [
        ("kuberay-operator", "1.7.0")]


def test_values_schema_refuses_latest():
    with pytest.raises(helm.HelmValuesError):
        _render({"image": {"tag": "latest"}})


def test_lint_is_clean_apart_from_the_unfetched_dependency():
    report = helm.lint(str(CHART), strict=True)
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    # `helm dependency build` fetches KubeRay's chart at install time; it is not vendored.
    assert [p for p in problems if "missing these dependencies: kuberay-operator" not in p] == []


def test_notes_show_the_first_apply():
    notes = _notes()
    assert "kubectl apply -f" in notes and "kubectl get r1d" in notes
    assert "KubeRayNotInstalled" in _notes({"kuberay-operator": {"enabled": False}})


def test_generated_files_have_not_drifted(tmp_path):
    stale = stale_files(ROOT)
    assert stale == [], f"stale generated files {stale}: run `{REGENERATE}`"
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    assert main(["--root", str(tmp_path)]) == 0
    for path in generated_files(ROOT):
        assert (tmp_path / path).read_bytes() == (ROOT / path).read_bytes(), (
            f"{path} differs from a fresh generation: run `{REGENERATE}`")


def test_plain_manifests_validate(r1d_validator):
    for name in ("rbac.yaml", "operator.yaml", "crd.yaml"):
        for obj in yaml.safe_load_all((ROOT / "manifests" / name).read_text()):
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert list(yaml.safe_load_all((ROOT / "manifests/rbac.yaml").read_text())) == build_rbac()
    assert list(yaml.safe_load_all((ROOT / "manifests/operator.yaml").read_text())) == \
        build_operator()
    examples = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        assert r1d_validator.errors(yaml.safe_load(path.read_text())) == [], path.name
