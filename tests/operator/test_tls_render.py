"""api.tls in Kubernetes: a gRPC TLS sidecar in every Ray pod, Serve's gRPC proxy moved to the internal port,
the client Service on the sidecar, and the CRD refusing what the spec refuses about TLS sources."""

import copy
from pathlib import Path

import pytest
import yaml

from r1serve.operator import constants as K
from r1serve.operator.render import render_rayservice, render_services
from r1serve.spec import SpecError, load_r1deployment
from r1serve.spec import constants as C
from r1serve.spec.serve_config import build_serve_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())


def _doc(tls: dict | None, grpc_port: int = 50051) -> dict:
    doc = copy.deepcopy(TINY)
    doc["spec"]["api"] = {"grpcPort": grpc_port, "httpPort": 8443}
    if tls is not None:
        doc["spec"]["api"]["tls"] = tls
    return doc


def _pods(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_every_ray_pod_gets_the_tls_sidecar():
    deployment = load_r1deployment(_doc({"secretName": "api-tls"}))
    pods = _pods(render_rayservice(deployment))
    assert len(pods) == 3  # head, prefill, decode
    for pod in pods:
        ray, sidecar = pod["spec"]["containers"]  # the Ray container stays first for KubeRay
        assert sidecar["name"] == "grpc-tls"
        assert sidecar["image"] == ray["image"]
        assert sidecar["command"] == [
            "r1serve", "grpc-tls", "--listen", "[::]:50051", "--backend", f"127.0.0.1:{C.GRPC_BACKEND_PORT}",
            "--cert", "/etc/r1serve/tls/tls.crt", "--key", "/etc/r1serve/tls/tls.key"]
        assert sidecar["ports"] == [{"name": "grpc-tls", "containerPort": 50051}]
        assert sidecar["volumeMounts"] == [{"name": K.TLS_VOLUME, "mountPath": C.TLS_MOUNT_PATH,
                                            "readOnly": True}]
        assert sidecar["securityContext"] == {**ray["securityContext"], "readOnlyRootFilesystem": True}
        assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        # Requests equal limits, so a worker pod keeps guaranteed QoS.
        assert sidecar["resources"]["requests"] == sidecar["resources"]["limits"]
        assert {"name": K.TLS_VOLUME, "secret": {"secretName": "api-tls"}} in pod["spec"]["volumes"]


def test_serve_grpc_moves_to_the_internal_port_and_the_service_targets_the_sidecar():
    deployment = load_r1deployment(_doc({"secretName": "api-tls"}))
    config = build_serve_config(deployment)
    assert config["grpc_options"]["port"] == C.GRPC_BACKEND_PORT
    assert (config["http_options"]["ssl_certfile"], config["http_options"]["ssl_keyfile"]) == (
        "/etc/r1serve/tls/tls.crt", "/etc/r1serve/tls/tls.key")
    [service] = render_services(deployment)
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == grpc["targetPort"] == 50051
    ports = {p["containerPort"] for c in _pods(render_rayservice(deployment))[0]["spec"]["containers"]
             for p in c.get("ports", [])}
    assert {C.GRPC_BACKEND_PORT, 50051} <= ports
    assert C.GRPC_BACKEND_PORT not in {p["targetPort"] for p in service["spec"]["ports"]}


def test_no_tls_means_no_sidecar_and_serve_on_the_api_port():
    deployment = load_r1deployment(_doc(None))
    assert build_serve_config(deployment)["grpc_options"]["port"] == 50051
    assert "ssl_certfile" not in build_serve_config(deployment)["http_options"]
    for pod in _pods(render_rayservice(deployment)):
        assert [c["name"] for c in pod["spec"]["containers"]] != [] and all(
            c["name"] != "grpc-tls" for c in pod["spec"]["containers"])


def test_local_files_are_used_as_given_and_nothing_is_mounted():
    deployment = load_r1deployment(_doc({"certFile": "/certs/r1.pem", "keyFile": "/certs/r1.key"}))
    config = build_serve_config(deployment)
    assert (config["http_options"]["ssl_certfile"], config["http_options"]["ssl_keyfile"]) == (
        "/certs/r1.pem", "/certs/r1.key")
    for pod in _pods(render_rayservice(deployment)):
        sidecar = pod["spec"]["containers"][1]
        assert sidecar["command"][-4:] == ["--cert", "/certs/r1.pem", "--key", "/certs/r1.key"]
        assert sidecar["volumeMounts"] == []
        assert all(v["name"] != K.TLS_VOLUME for v in pod["spec"]["volumes"])


@pytest.mark.parametrize("tls", [{"secretName": "api-tls"}, {"certFile": "/c.pem", "keyFile": "/k.pem"}])
def test_tls_rayservice_validates_against_kuberay_crd(kuberay_rayservice, tls):
    rayservice = render_rayservice(load_r1deployment(_doc(tls)), owner_uid="uid", generation=1)
    assert kuberay_rayservice.errors(rayservice) == []


INVALID = [
    ("no_source", {}, "spec.api.tls"),
    ("both_sources", {"secretName": "s", "certFile": "/c", "keyFile": "/k"}, "spec.api.tls.secretName"),
    ("cert_without_key", {"certFile": "/c"}, "spec.api.tls.keyFile"),
    ("key_without_cert", {"keyFile": "/k"}, "spec.api.tls.certFile"),
    ("relative_cert", {"certFile": "certs/c.pem", "keyFile": "/k"}, "spec.api.tls.certFile"),
]


@pytest.mark.parametrize("tls, field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_crd_and_spec_refuse_bad_tls_sources(r1d_validator, tls, field):
    doc = _doc(tls)
    doc["metadata"]["namespace"] = "default"
    errors = r1d_validator.errors(doc)
    assert errors, "accepted by the CRD"
    assert field in "\n".join(errors).replace("[", ".").replace("]", "")
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_r1deployment(doc)


def test_crd_refuses_the_internal_grpc_port(r1d_validator):
    doc = _doc(None, grpc_port=C.GRPC_BACKEND_PORT)
    assert any("spec.api.grpcPort" in e for e in r1d_validator.errors(doc))
    with pytest.raises(SpecError, match="spec.api.grpcPort"):
        load_r1deployment(doc)
