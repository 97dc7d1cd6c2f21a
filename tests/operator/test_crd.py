"""The R1Deployment CRD: structural, documented, defaulted like the spec, and refusing what the spec refuses."""

import copy
import re
from pathlib import Path

import celpy
import kubernetes_validate
import pytest
import yaml

from r1serve.spec import load_r1deployment
from r1serve.spec.crd import CONDITION_TYPES, PHASES, build_crd

from ..spec.invalid_cases import BASE, DELETE, INVALID, Layer, changed

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CRD_CASES = [row for row in INVALID if Layer.CRD in row.layers]


def _server_paths(text: str) -> str:
    """jsonschema's `a.0.b` paths written as the API server writes them: `a[0].b`."""
    return re.sub(r"\.(\d+)(?=[.:\s]|$)", r"[\1]", text)


def test_examples_and_base_are_accepted(r1d_validator):
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert r1d_validator.errors(yaml.safe_load(path.read_text())) == [], path.name
    assert r1d_validator.errors(BASE) == []


@pytest.mark.parametrize("row", CRD_CASES, ids=[row.id for row in CRD_CASES])
def test_invalid_spec_is_refused_naming_the_field(r1d_validator, row):
    errors = r1d_validator.errors(row.doc)
    assert errors, "accepted by the CRD"
    text = _server_paths("\n".join(errors))
    assert row.field in text, text


VALID_VOLUMES = [
    ("claim", "/models/DeepSeek-R1", {"claimName": "weights"}),
    ("host_path", "/models/DeepSeek-R1", {"hostPath": "/nvme/models"}),
    ("nfs", "/models/DeepSeek-R1", {"nfs": {"server": "10.0.0.5", "path": "/"}}),
    ("source_is_the_mount", "/weights/r1", {"claimName": "weights", "mountPath": "/weights/r1",
                                            "subPath": "checkpoints/DeepSeek-R1"}),
    ("nested_mount", "/opt/models/r1/v3", {"hostPath": "/nvme/r1", "mountPath": "/opt/models/r1"}),
]


@pytest.mark.parametrize("source, volume", [c[1:] for c in VALID_VOLUMES],
                         ids=[c[0] for c in VALID_VOLUMES])
def test_valid_model_volumes_are_accepted_by_both_layers(r1d_validator, source, volume):
    doc = changed(spec__model__source=source, spec__model__volume=volume)
    assert r1d_validator.errors(doc) == []
    loaded = load_r1deployment(doc)
    assert r1d_validator.defaulted(doc)["spec"] == loaded.to_manifest()["spec"]
    assert loaded.spec.model.volume.mount_path == volume.get("mountPath", "/models")


def test_incremental_upgrade_is_accepted_and_defaulted_alike_by_both_layers(r1d_validator):
    doc = changed(spec__upgrade={"strategy": "NewClusterWithIncrementalUpgrade",
                                 "clusterUpgradeOptions": {"gatewayClassName": "istio",
                                                           "stepSizePercent": 5,
                                                           "intervalSeconds": 30}})
    assert r1d_validator.errors(doc) == []
    defaulted = r1d_validator.defaulted(doc)["spec"]
    assert defaulted == load_r1deployment(doc).to_manifest()["spec"]
    assert defaulted["upgrade"]["clusterUpgradeOptions"]["maxSurgePercent"] == 100


VALID_PLACEMENT = [
    ("match_every_taint", {"tolerations": [{"operator": "Exists"}]}),
    ("equal_with_empty_value", {"tolerations": [{"key": "dedicated", "value": ""}]}),
    ("no_execute_for_a_while", {"tolerations": [{
        "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
        "tolerationSeconds": 300}]}),
    ("prefixed_selector", {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                            "pool": ""}}),
    ("pod_labels", {"podLabels": {"team": "ml", "example.com/cost-center": "a_1.B",
                                  "app.kubernetes.io/version": "0.1.0"}}),
    ("longest_key_and_value", {"podLabels": {"a" * 253 + "/" + "b" * 63: "c" * 63}}),
]


@pytest.mark.parametrize("workers", [c[1] for c in VALID_PLACEMENT],
                         ids=[c[0] for c in VALID_PLACEMENT])
def test_valid_placement_and_pod_labels_are_accepted_by_both_layers(r1d_validator, workers):
    doc = changed(spec__workers=workers, spec__decode__workers=workers)
    assert r1d_validator.errors(doc) == []
    assert r1d_validator.defaulted(doc)["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def test_the_table_is_big_enough():
    assert len(CRD_CASES) >= 10


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_defaults_equal_the_spec_defaults(r1d_validator, path):
    doc = yaml.safe_load(path.read_text())
    assert r1d_validator.defaulted(doc)["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def test_minimal_spec_defaults_equal_the_spec_defaults(r1d_validator):
    doc = changed(spec__prefill={}, spec__decode={}, spec__experts=DELETE,
                  spec__model={"source": "/models/r1"})
    assert r1d_validator.defaulted(doc)["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def _walk(node, path):
    yield path, node
    for name, prop in (node.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _version(crd):
    [version] = crd["spec"]["versions"]
    return version


def test_schema_is_structural_and_explained(r1d_crd):
    root = _version(r1d_crd)["schema"]["openAPIV3Schema"]
    for path, node in _walk(root, ""):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "$ref" not in node and "anyOf" not in node, path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if path.startswith((".spec", ".status")) and not path.endswith("{}"):
            assert node.get("description"), f"{path}: kubectl explain would show nothing"


def test_cel_rules_compile_and_name_fields(r1d_crd):
    root = _version(r1d_crd)["schema"]["openAPIV3Schema"]
    rules = [rule for _, node in _walk(root, "") for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    env = celpy.Environment()
    for rule in rules:
        env.compile(rule["rule"])
        assert rule["message"]
        if "messageExpression" in rule:
            env.compile(rule["messageExpression"])


def test_names_status_and_printer_columns(r1d_crd):
    spec = r1d_crd["spec"]
    assert r1d_crd["metadata"]["name"] == "r1deployments.r1serve.io"
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        "r1serve.io", "Namespaced", "R1Deployment")
    assert spec["names"]["shortNames"] == ["r1d"]
    version = _version(r1d_crd)
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["phase"]["enum"] == list(PHASES)
    assert set(CONDITION_TYPES) == {"Ready", "Progressing", "Degraded"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Phase": ".status.phase", "Prefill": ".status.prefill.summary",
                       "Decode": ".status.decode.summary", "gRPC": ".status.endpoints.grpc",
                       "Age": ".metadata.creationTimestamp"}
    for path in columns.values():
        if path.startswith(".status"):
            node = status
            for key in path.split(".")[2:]:
                node = node["properties"][key]


def test_crd_object_validates_as_apiextensions_v1(r1d_crd):
    kubernetes_validate.validate(copy.deepcopy(r1d_crd), "1.33.0", strict=True)


def test_generated_yaml_parses_back_to_the_same_object():
    from r1serve.spec.crd import crd_yaml

    assert yaml.safe_load(crd_yaml()) == build_crd()
