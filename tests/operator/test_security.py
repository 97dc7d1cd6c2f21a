"""What the rendered objects expose and how their pods run: no Ray-internal port on a client-facing Service,
non-root Ray pods without privilege escalation or capabilities, the API token only from its Secret."""

from pathlib import Path

import pytest
import yaml
from r1serve.operator import constants as K
from r1serve.operator.manifests import build_operator
from r1serve.operator.render import render_rayservice, render_services

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
