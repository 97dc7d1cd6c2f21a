"""Every Ray pod the operator's RayService leads to, as KubeRay builds it, passes Pod Security admission at the
level the model volume allows, and scheduling fields are ones the server takes (server dry-run Pod creates)."""

from __future__ import annotations

import copy

import pytest
import yaml

from r1serve.operator import constants as K
from r1serve.operator import render
from r1serve.spec import load_r1deployment

from ..operator.test_security import kuberay_pods
from .conftest import ROOT

LEVELS = ("restricted", "baseline", "privileged")
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
VOLUMES = {
    "none": None,
    "pvc": {"claimName": "weights"},
    "nfs": {"nfs": {"server": "nfs.example.internal", "path": "/exports/models"}},
    "host-path": {"hostPath": "/nvme/models"},
}
# The most restrictive level each volume source allows: "restricted" admits PVCs but no nfs
# volume, "baseline" admits nfs but no hostPath.
EXPECTED_LEVEL = {"none": "restricted", "pvc": "restricted", "nfs": "baseline",
                  "host-path": "privileged"}


def _deployment(path, volume: dict | None):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"]["model"]
    if volume is not None:
        if spec["source"].startswith("tiny:"):
            spec["source"] = "/models/DeepSeek-R1"
        spec["volume"] = volume
    return load_r1deployment(doc)


@pytest.fixture(scope="module")
def namespaces(cluster) -> dict[str, str]:
    """One namespace per Pod Security level, each enforcing it."""
    return {level: cluster.new_namespace(
        f"pss-{level}", labels={"pod-security.kubernetes.io/enforce": level,
                                "pod-security.kubernetes.io/enforce-version": "latest"})
        for level in LEVELS}


@pytest.mark.parametrize("volume", VOLUMES, ids=str)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_ray_pods_pass_exactly_the_level_their_model_volume_allows(cluster, namespaces, path, volume):
    deployment = _deployment(path, VOLUMES[volume])
    level = render.pod_security_level(deployment)
    assert level == EXPECTED_LEVEL[volume]
    for template in kuberay_pods(render.render_rayservice(deployment)):
        name = template["metadata"]["labels"][K.LABEL_COMPONENT]
        refused = cluster.pod_refusal(namespaces[level], name, template)
        assert refused is None, f"{name} pod refused at {level}: {refused}"
        stricter = LEVELS[LEVELS.index(level) - 1] if level != "restricted" else None
        if stricter:
            # ... and the level is the strictest that admits it: the documented level is needed.
            assert "violates PodSecurity" in (cluster.pod_refusal(namespaces[stricter], name, template)
                                             or ""), f"{name} passes {stricter} too"


# Scheduling fields as r1serve accepts them: the server's Pod validation must agree.
ACCEPTED_PLACEMENT = [
    ("gpu_taint", {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}]}),
    ("equal_with_value", {"tolerations": [{"key": "dedicated", "value": "r1", "effect": "NoExecute",
                                           "tolerationSeconds": 300}]}),
    ("match_all_taints", {"tolerations": [{"operator": "Exists"}]}),
    ("prefixed_selector", {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                            "pool": ""}}),
]


@pytest.mark.parametrize("workers", [c[1] for c in ACCEPTED_PLACEMENT],
                         ids=[c[0] for c in ACCEPTED_PLACEMENT])
def test_accepted_placement_is_accepted_by_the_server(cluster, namespaces, workers):
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["spec"]["workers"] = workers
    for template in kuberay_pods(render.render_rayservice(load_r1deployment(doc))):
        assert cluster.pod_refusal(namespaces["restricted"], "placement", template) is None


# What the spec refuses, written straight into a pod: the server refuses it too, so refusing it at
# the R1Deployment (before any pod exists) loses nothing a user could have had.
REFUSED_PLACEMENT = [
    ("exists_with_value", "tolerations", [{"key": "gpu", "operator": "Exists", "value": "yes"}]),
    ("equal_without_key", "tolerations", [{"operator": "Equal", "value": "x"}]),
    ("bad_toleration_key", "tolerations", [{"key": "has space", "operator": "Exists"}]),
    ("seconds_without_no_execute", "tolerations",
     [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]),
    ("bad_selector_key", "nodeSelector", {"bad key": "x"}),
    ("bad_selector_value", "nodeSelector", {"gpu": "not a label value"}),
]


@pytest.mark.parametrize("field, value", [c[1:] for c in REFUSED_PLACEMENT],
                         ids=[c[0] for c in REFUSED_PLACEMENT])
def test_placement_the_spec_refuses_is_refused_by_the_server(cluster, namespaces, field, value):
    from r1serve.spec import SpecError

    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["spec"]["workers"] = {field: value}
    with pytest.raises(SpecError):
        load_r1deployment(doc)
    template = render.render_rayservice(load_r1deployment(
        yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())))[
        "spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    template = copy.deepcopy(template)
    template["spec"][field] = value
    assert cluster.pod_refusal(namespaces["privileged"], "placement", template) is not None
