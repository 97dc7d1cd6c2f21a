"""Every kind of rendered child accepted by the API server: RayServices against KubeRay 1.7's own CRD (with its
incremental upgrade, TLS, auth, volumes, placement) and the client Services, as server dry runs."""

from __future__ import annotations

import copy

import pytest
import yaml

from r1serve.operator import render
from r1serve.spec import load_r1deployment

from .conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INCREMENTAL = {"strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
    "gatewayClassName": "istio", "stepSizePercent": 10, "intervalSeconds": 60, "maxSurgePercent": 50}}
VARIANTS = {
    "as-written": {},
    # api.tls excluded: KubeRay's Gateway speaks plaintext HTTP to Serve (the spec refuses both).
    "incremental-upgrade": {"upgrade": INCREMENTAL, "api": {}},
    "no-upgrade": {"upgrade": {"strategy": "None"}},
    "tls-and-auth": {"api": {"tls": {"secretName": "r1-tls"}, "auth": {"secretName": "r1-token"}}},
    "pvc": {"model": {"source": "/models/DeepSeek-R1", "volume": {"claimName": "weights"}}},
    "nfs": {"model": {"source": "/models/DeepSeek-R1", "volume": {
        "nfs": {"server": "nfs.example.internal", "path": "/exports"}}}},
    "host-path": {"model": {"source": "/models/DeepSeek-R1", "volume": {"hostPath": "/nvme/models"}}},
    "placement": {"workers": {
        "podLabels": {"team": "search"}, "nodeSelector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
}


def _variant(path, changes: dict):
    doc = yaml.safe_load(path.read_text())
    for section, value in changes.items():
        if section == "model":
            doc["spec"]["model"] = {**doc["spec"]["model"], **copy.deepcopy(value)}
        else:
            doc["spec"][section] = copy.deepcopy(value)
    return load_r1deployment(doc)


@pytest.fixture(scope="module")
def namespace(cluster, kuberay_installed) -> str:
    return cluster.new_namespace("render")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_children_are_accepted_by_the_server(cluster, namespace, path, variant):
    deployment = _variant(path, VARIANTS[variant])
    for child in render.render_children(deployment, owner_uid="0f0e0d0c-0000-4000-8000-000000000000",
                                        generation=3):
        child = copy.deepcopy(child)
        child["metadata"]["namespace"] = namespace
        # Strict, like the operator's apply: a field KubeRay's schema lacks is refused, not dropped.
        if child["kind"] == "Service":
            cluster.core.create_namespaced_service(namespace, child, dry_run="All",
                                                   field_validation="Strict")
        else:
            group, version = child["apiVersion"].split("/")
            cluster.custom.create_namespaced_custom_object(
                group, version, namespace, "rayservices", child, dry_run="All",
                field_validation="Strict")
