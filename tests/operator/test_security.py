"""What the rendered objects expose and how their pods run: no Ray-internal port on a client-facing Service,
Ray pods, with what KubeRay adds to them, within Pod Security "restricted", the API token only from
its Secret."""

import copy
from pathlib import Path

import pytest
import yaml

from r1serve.operator import constants as K
from r1serve.operator.manifests import build_operator
from r1serve.operator.render import pod_security_level, render_rayservice, render_services
from r1serve.spec import constants as C
from r1serve.spec import load_r1deployment

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RAY_PORTS = {6379, 8265, 10001}


def _docs():
    tiny = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    secured = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    secured["spec"]["api"].update(auth={"secretName": "api-token"}, tls={"secretName": "api-tls"})
    prod = yaml.safe_load((EXAMPLES / "r1-production.yaml").read_text())
    return {"tiny": tiny, "secured": secured, "production": prod}


@pytest.fixture(params=list(_docs()))
def deployment(request):
    return load_r1deployment(_docs()[request.param])


def _pods(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_services_never_expose_ray_ports(deployment):
    for service in render_services(deployment):
        ports = service["spec"]["ports"]
        assert {p["port"] for p in ports} & RAY_PORTS == set()
        assert {p["targetPort"] for p in ports} & RAY_PORTS == set()
    # KubeRay's serve Service takes the head ports named serve / serve-*: only the API's, and
    # behind TLS not Serve's plaintext gRPC port (the client Service targets the TLS sidecar).
    head = render_rayservice(deployment)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    serve_ports = [p for p in head["spec"]["containers"][0]["ports"] if p["name"].startswith("serve")]
    api = deployment.spec.api
    expected = [api.http_port] if api.tls else [api.grpc_port, api.http_port]
    assert sorted(p["containerPort"] for p in serve_ports) == sorted(expected)
    assert head["spec"]["containers"][0]["ports"] and not ({p["containerPort"] for p in serve_ports} & RAY_PORTS)


def test_ray_pods_run_non_root_without_privileges(deployment):
    for pod in _pods(render_rayservice(deployment)):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] != 0
        for container in pod["spec"]["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


def kuberay_pods(rayservice: dict) -> list[dict]:
    """The pod templates as KubeRay 1.7 completes them before creating pods: the head gets the
    autoscaler sidecar, whose only context is autoscalerOptions.securityContext, and each worker
    the wait-gcs-ready init container, which copies the Ray container's context."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = copy.deepcopy(cluster["headGroupSpec"]["template"])
    options = cluster.get("autoscalerOptions") or {}
    autoscaler = {"name": "autoscaler", "image": head["spec"]["containers"][0]["image"]}
    if "securityContext" in options:
        autoscaler["securityContext"] = copy.deepcopy(options["securityContext"])
    head["spec"]["containers"].append(autoscaler)
    pods = [head]
    for group in cluster["workerGroupSpecs"]:
        worker = copy.deepcopy(group["template"])
        ray = worker["spec"]["containers"][0]
        init = {"name": "wait-gcs-ready", "image": ray["image"]}
        if "securityContext" in ray:
            init["securityContext"] = copy.deepcopy(ray["securityContext"])
        worker["spec"].setdefault("initContainers", []).append(init)
        pods.append(worker)
    return pods


# Pod Security "restricted": the volume types it admits and, per container, what it requires.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(template: dict) -> list[str]:
    """What keeps a pod template out of a namespace enforcing "restricted" (nothing: admitted)."""
    spec, found = template["spec"], []
    pod = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(flag)
    for volume in spec.get("volumes", []):
        if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}")
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        own = container.get("securityContext") or {}
        context = {**pod, **own}
        name = container["name"]
        if own.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = own.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if own.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
            found.append(f"{name}: may run as root")
        if (context.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: no RuntimeDefault or Localhost seccomp profile")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: host port")
    return found


def test_every_ray_pod_kuberay_creates_meets_restricted(deployment):
    assert pod_security_level(deployment) == "restricted"
    pods = kuberay_pods(render_rayservice(deployment))
    names = {c["name"] for pod in pods for c in pod["spec"]["containers"] + pod["spec"].get(
        "initContainers", [])}
    assert {K.HEAD_CONTAINER, "autoscaler", K.WORKER_CONTAINER, "wait-gcs-ready"} <= names
    if deployment.spec.api.tls is not None:
        assert K.GRPC_TLS_CONTAINER in names
    for pod in pods:
        assert restricted_violations(pod) == [], pod["metadata"]["labels"][K.LABEL_COMPONENT]


def test_the_restricted_check_sees_what_it_must():
    [head, *_] = kuberay_pods(render_rayservice(load_r1deployment(_docs()["secured"])))
    assert restricted_violations(head) == []
    for context, fragment in [("seccompProfile", "seccomp"), ("runAsNonRoot", "root")]:
        loose = copy.deepcopy(head)
        del loose["spec"]["securityContext"][context]
        assert any(fragment in v for v in restricted_violations(loose)), context
    loose = copy.deepcopy(head)
    loose["spec"]["containers"][-1].pop("securityContext")
    assert "autoscaler: allowPrivilegeEscalation is not false" in restricted_violations(loose)
    loose = copy.deepcopy(head)
    loose["spec"]["volumes"].append({"name": "weights", "nfs": {"server": "nfs", "path": "/"}})
    assert restricted_violations(loose) == ["volume weights"]


def test_operator_pod_is_non_root_with_a_read_only_root():
    [deployment] = [o for o in build_operator() if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]


def test_token_reaches_pods_only_from_its_secret():
    deployment = load_r1deployment(_docs()["secured"])
    for pod in _pods(render_rayservice(deployment)):
        [env] = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == C.API_TOKEN_ENV]
        assert env == {"name": C.API_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
            "name": "api-token", "key": C.API_TOKEN_SECRET_KEY}}}
        assert {v["name"] for v in pod["spec"]["volumes"]} >= {K.TLS_VOLUME}
