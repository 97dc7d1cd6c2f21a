"""Rendering: every RayService validates against KubeRay's CRD, built-in objects against Kubernetes' schemas."""

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from r1serve import __version__
from r1serve.operator import constants as K
from r1serve.operator.config import OperatorConfig
from r1serve.operator.render import (
    endpoints,
    expert_load_configmap,
    pod_labels,
    pod_security_level,
    render_children,
    render_rayservice,
    render_services,
)
from r1serve.spec import SpecError, expert_load, load_r1deployment
from r1serve.spec import quantity as quantity_module

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
PROD = yaml.safe_load((EXAMPLES / "r1-production.yaml").read_text())
KUBE_VERSION = "1.33.0"


def _variant(base: dict, **spec_changes) -> dict:
    doc = copy.deepcopy(base)
    for key, value in spec_changes.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


VARIANTS = {
    "tiny": TINY,
    "production": PROD,
    "aggregated": _variant(TINY, disaggregation=False, prefill=None),
    "gpu-defaults": {"apiVersion": "r1serve.io/v1alpha1", "kind": "R1Deployment",
                     "metadata": {"name": "r1", "namespace": "ml", "labels": {"team": "x"}},
                     "spec": {"model": {"source": "/models/r1"}, "prefill": {}, "decode": {}}},
    "auth-and-tls": _variant(TINY, api={"grpcPort": 50051, "httpPort": 8080,
                                        "auth": {"secretName": "tok"}, "tls": {"secretName": "t"}}),
    "pool-overrides": _variant(PROD, workers={"image": "img:2", "shmSize": "1Gi",
                                              "resources": {"cpu": "500m"}}),
    "host-path-weights": _variant(PROD, model={
        "source": "/opt/r1/DeepSeek-R1", "numRoutedExperts": 256,
        "volume": {"hostPath": "/mnt/nvme/models", "mountPath": "/opt/r1"}}),
    "nfs-weights": _variant(PROD, model={
        "source": "/models", "numRoutedExperts": 256,
        "volume": {"nfs": {"server": "nfs.storage.svc", "path": "/exports"},
                   "subPath": "DeepSeek-R1"}}),
}


@pytest.fixture(params=sorted(VARIANTS), ids=str)
def deployment(request):
    return load_r1deployment(copy.deepcopy(VARIANTS[request.param]))


def test_rayservice_validates_against_kuberay_crd(deployment, kuberay_rayservice):
    rayservice = render_rayservice(deployment, owner_uid="0b9f-uid", generation=3)
    assert kuberay_rayservice.errors(rayservice) == []


def test_kuberay_validator_rejects_a_typo(kuberay_rayservice):
    rayservice = render_rayservice(load_r1deployment(TINY))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in kuberay_rayservice.errors(rayservice))


def test_builtin_objects_validate_against_kubernetes_schemas(deployment):
    rayservice, *services = render_children(deployment, owner_uid="0b9f-uid", generation=1)
    for service in services:
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def test_rendering_is_pure_and_deterministic(deployment):
    first = render_children(deployment, owner_uid="u", generation=2)
    assert first == render_children(deployment, owner_uid="u", generation=2)
    assert yaml.safe_dump(first) == yaml.safe_dump(
        render_children(deployment, owner_uid="u", generation=2))


def test_children_are_owned_by_the_r1deployment(deployment):
    for child in render_children(deployment, owner_uid="0b9f-uid"):
        [ref] = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "r1serve.io/v1alpha1", "kind": "R1Deployment",
                       "name": deployment.metadata.name, "uid": "0b9f-uid",
                       "controller": True, "blockOwnerDeletion": True}
        assert child["metadata"]["namespace"] == deployment.metadata.namespace
        assert child["metadata"]["labels"][K.LABEL_DEPLOYMENT] == deployment.metadata.name


def test_head_declares_ray_and_serve_ports_and_service_exposes_only_serve(deployment):
    head = render_rayservice(deployment)["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"]
             for p in head["template"]["spec"]["containers"][0]["ports"]}
    api = deployment.spec.api
    # Behind TLS, Serve's gRPC proxy is the sidecar's plaintext backend: never a serve-* port.
    grpc = {"grpc-backend": 9001} if api.tls else {"serve-grpc": api.grpc_port}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001,
                     "serve": api.http_port, **grpc}
    [service] = render_services(deployment)
    exposed = {p["port"] for p in service["spec"]["ports"]}
    assert exposed == {api.grpc_port, api.http_port}
    assert not exposed & {6379, 8265, 10001}
    assert service["spec"]["selector"] == {K.LABEL_DEPLOYMENT: deployment.metadata.name,
                                           "ray.io/serve": "true"}


def test_cluster_settings(deployment):
    cluster = render_rayservice(deployment)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == "2.60.0"
    groups = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert groups == list(deployment.spec.active_pools())
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
        assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory"
                   for v in spec["volumes"])
        assert not spec["containers"][0]["image"].endswith(":latest")


def test_production_pools_are_sized_in_whole_nodes():
    deployment = load_r1deployment(copy.deepcopy(PROD))
    groups = {g["groupName"]: g for g in
              render_rayservice(deployment)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    prefill, decode = groups["prefill"], groups["decode"]
    # 32 ranks = 4 pods of 8 GPUs per replica; replicas 1..4, initial 2.
    assert (prefill["minReplicas"], prefill["maxReplicas"], prefill["replicas"]) == (4, 16, 8)
    assert (decode["minReplicas"], decode["maxReplicas"], decode["replicas"]) == (18, 36, 18)
    limits = prefill["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "97", "memory": "1600Gi", "nvidia.com/gpu": "8"}
    assert prefill["resources"] == {"r1serve_prefill_rank": "8"}
    decode_spec = decode["template"]["spec"]
    assert decode_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                           "r1serve.io/pool": "decode"}
    assert decode_spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_a_connector_only_one_machine_can_use_is_not_rendered_for_kubernetes():
    doc = _variant(PROD, kvTransfer={"connector": "cuda-ipc"})
    with pytest.raises(SpecError, match=r"spec.kvTransfer.connector: cuda-ipc works only where both pools run on one "
                                        r"machine \(r1serve serve\)"):
        render_children(load_r1deployment(doc))


def test_image_choice():
    tiny = load_r1deployment(copy.deepcopy(TINY))
    head = render_rayservice(tiny)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/r1serve/r1serve:{__version__}"
    gpu = load_r1deployment(copy.deepcopy(VARIANTS["gpu-defaults"]))
    groups = render_rayservice(gpu)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert {g["template"]["spec"]["containers"][0]["image"] for g in groups} == {
        f"ghcr.io/r1serve/r1serve:{__version__}-gpu"}
    configured = render_rayservice(tiny, config=OperatorConfig(default_image="my/ray:1"))
    images = {g["template"]["spec"]["containers"][0]["image"]
              for g in configured["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert images == {"my/ray:1"}
    with pytest.raises(ValueError, match="pinned"):
        OperatorConfig(default_image="my/ray:latest")


def test_credentials_reach_every_ray_pod():
    deployment = load_r1deployment(copy.deepcopy(VARIANTS["auth-and-tls"]))
    cluster = render_rayservice(deployment)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        container = pod["template"]["spec"]["containers"][0]
        assert container["env"] == [{"name": "R1SERVE_API_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": "tok", "key": "token"}}}]
        assert {"name": "tls", "mountPath": "/etc/r1serve/tls", "readOnly": True} in \
            container["volumeMounts"]
    assert endpoints(deployment) == {"grpc": "tiny.default.svc:50051",
                                     "http": "https://tiny.default.svc:8080"}


def _ray_pod_specs(deployment) -> list[dict]:
    cluster = render_rayservice(deployment)["spec"]["rayClusterConfig"]
    return [group["template"]["spec"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


@pytest.mark.parametrize("variant, mount, volume", [
    ("production", {"mountPath": "/models"},
     {"persistentVolumeClaim": {"claimName": "deepseek-r1-weights", "readOnly": True}}),
    ("host-path-weights", {"mountPath": "/opt/r1"},
     {"hostPath": {"path": "/mnt/nvme/models", "type": "Directory"}}),
    ("nfs-weights", {"mountPath": "/models", "subPath": "DeepSeek-R1"},
     {"nfs": {"server": "nfs.storage.svc", "path": "/exports", "readOnly": True}}),
])
def test_model_volume_is_mounted_read_only_in_every_ray_pod(variant, mount, volume):
    deployment = load_r1deployment(copy.deepcopy(VARIANTS[variant]))
    specs = _ray_pod_specs(deployment)
    assert len(specs) == 3  # the head (Ingress: tokenizer, config.json), prefill and decode
    for spec in specs:
        ray, *sidecars = spec["containers"]
        assert {"name": K.MODEL_VOLUME, **mount, "readOnly": True} in ray["volumeMounts"]
        assert {"name": K.MODEL_VOLUME, **volume} in spec["volumes"]
        assert [v["name"] for v in spec["volumes"]].count(K.MODEL_VOLUME) == 1
        # The gRPC TLS front never reads the checkpoint.
        assert all(m["name"] != K.MODEL_VOLUME for c in sidecars for m in c["volumeMounts"])
        assert deployment.spec.model.source.startswith(mount["mountPath"])


@pytest.mark.parametrize("variant", ["tiny", "gpu-defaults", "auth-and-tls"])
def test_no_model_volume_is_rendered_without_spec_model_volume(variant):
    for spec in _ray_pod_specs(load_r1deployment(copy.deepcopy(VARIANTS[variant]))):
        assert all(v["name"] != K.MODEL_VOLUME for v in spec["volumes"])
        assert all(m["name"] != K.MODEL_VOLUME
                   for c in spec["containers"] for m in c["volumeMounts"])


@pytest.mark.parametrize("variant", ["tiny", "production"])
def test_every_ray_pod_mounts_the_kept_expert_load_optionally_from_the_first_render(variant):
    """The ConfigMap appears later (once replicas report load): optional, and already in the template, so its
    appearance changes no pod template."""
    deployment = load_r1deployment(copy.deepcopy(VARIANTS[variant]))
    name = expert_load.configmap_name(deployment.metadata.name)
    for spec in _ray_pod_specs(deployment):
        assert {"name": expert_load.VOLUME, "configMap": {"name": name, "optional": True}} in spec["volumes"]
        assert {"name": expert_load.VOLUME, "mountPath": expert_load.MOUNT_PATH, "readOnly": True} in \
            spec["containers"][0]["volumeMounts"]


def test_the_expert_load_configmap_is_owned_by_the_resource():
    deployment = load_r1deployment(copy.deepcopy(VARIANTS["tiny"]))
    configmap = expert_load_configmap(deployment, "uid-1", {"decode.json": "{}"})
    assert configmap["metadata"]["name"] == "tiny-expert-load" and configmap["data"] == {"decode.json": "{}"}
    [owner] = configmap["metadata"]["ownerReferences"]
    assert (owner["uid"], owner["controller"], owner["kind"]) == ("uid-1", True, "R1Deployment")
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("variant", ["tiny", "production"])
def test_a_label_edit_of_the_resource_changes_no_child(variant):
    """`kubectl label` on the resource must not reach rayClusterConfig (a second Ray cluster)."""
    plain = copy.deepcopy(VARIANTS[variant])
    plain["metadata"]["labels"] = {"team": "a"}
    relabelled = copy.deepcopy(plain)
    relabelled["metadata"]["labels"] = {"team": "b", "cost-center": "ml"}
    a = render_children(load_r1deployment(plain), owner_uid="u", generation=1)
    b = render_children(load_r1deployment(relabelled), owner_uid="u", generation=2)
    assert yaml.safe_dump(a[0]["spec"]) == yaml.safe_dump(b[0]["spec"])
    assert [yaml.safe_dump(child) for child in a[1:]] == [yaml.safe_dump(child) for child in b[1:]]
    for child in b:
        assert not {"team", "cost-center"} & set(child["metadata"]["labels"])
    assert b[0]["metadata"]["annotations"] == {K.ANNOTATION_SOURCE_GENERATION: "2"}


def test_pod_labels_reach_every_pod_template_and_a_pool_merges_its_own():
    doc = copy.deepcopy(PROD)
    doc["spec"]["workers"]["podLabels"] = {"team": "ml", "tier": "serve"}
    doc["spec"]["decode"]["workers"]["podLabels"] = {"tier": "decode", "example.com/gpu": "h100"}
    rayservice = render_rayservice(load_r1deployment(doc))
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g["template"]["metadata"]["labels"]
              for g in cluster["workerGroupSpecs"]}
    expected = {"head": {"team": "ml", "tier": "serve"},
                "prefill": {"team": "ml", "tier": "serve"},
                "decode": {"team": "ml", "tier": "decode", "example.com/gpu": "h100"}}
    for name, labels in {"head": cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                         **groups}.items():
        assert {k: v for k, v in labels.items() if k in expected[name]} == expected[name], name
        assert labels[K.LABEL_DEPLOYMENT] == "deepseek-r1" and labels[K.LABEL_NAME] == "r1serve"
    assert groups["decode"][K.LABEL_POOL] == "decode"
    # Pod labels are the pods': not on the RayService or the client Service.
    for child in render_children(load_r1deployment(doc)):
        assert "team" not in child["metadata"]["labels"]


def test_every_label_r1serve_puts_on_a_pod_is_refused_as_a_pod_label():
    deployment = load_r1deployment(copy.deepcopy(PROD))
    ours = {key for role in (None, "prefill", "decode") for key in pod_labels(deployment, role)}
    assert K.LABEL_POOL in ours
    for key in sorted(ours | {K.KUBERAY_CLUSTER_LABEL, K.KUBERAY_SERVE_LABEL}):
        doc = copy.deepcopy(PROD)
        doc["spec"]["workers"]["podLabels"] = {key: "x"}
        with pytest.raises(SpecError, match="reserved for r1serve and KubeRay"):
            load_r1deployment(doc)


@pytest.mark.parametrize("variant, level", [
    ("tiny", "restricted"), ("production", "restricted"), ("nfs-weights", "baseline"),
    ("host-path-weights", "privileged")])
def test_pod_security_level_follows_the_model_volume(variant, level):
    assert pod_security_level(load_r1deployment(copy.deepcopy(VARIANTS[variant]))) == level


@pytest.mark.parametrize("quantity, factor, expected", [
    ("64Gi", 4, "256Gi"), ("1.5G", 3, "4.5G"), ("8", 2, "16"), ("200Gi", 8, "1600Gi")])
def test_scale_quantity(quantity, factor, expected):
    assert quantity_module.scale(quantity, factor) == expected


def test_four_gpu_nodes_get_four_gpu_worker_pods():
    """gpusPerNode sizes the worker pods: 8 ranks of 1 GPU on 4-GPU nodes are 2 pods of 4 GPUs per replica."""
    doc = copy.deepcopy(VARIANTS["gpu-defaults"])
    doc["spec"]["decode"].update(expertParallel=8, gpusPerRank=1, gpusPerNode=4, replicas={"min": 1, "max": 3})
    deployment = load_r1deployment(doc)
    [decode] = [g for g in render_rayservice(deployment)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                if g["groupName"] == "decode"]
    limits = decode["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits[K.GPU_RESOURCE] == "4"
    assert (decode["minReplicas"], decode["maxReplicas"]) == (2, 6)
    assert decode["resources"] == {"r1serve_decode_rank": "4"}
