"""The R1Deployment CRD on a real API server: created and Established, examples accepted and defaulted
exactly like the spec model, invalid specs refused naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from r1serve.spec import load_r1deployment

from ..spec.invalid_cases import INVALID, Layer
from .conftest import ROOT, refusal

GROUP, VERSION, PLURAL = "r1serve.io", "v1alpha1", "r1deployments"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CHART_CRD = ROOT / "charts" / "r1serve-operator" / "crds" / "r1deployments.r1serve.io.yaml"


def _create(cluster, namespace: str, doc: dict, *, dry_run: bool = True) -> dict:
    doc = copy.deepcopy(doc)
    doc.setdefault("metadata", {})["namespace"] = namespace
    # Strict field validation, as kubectl sends it: unknown fields are refused, not pruned.
    return cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, doc, field_validation="Strict",
        **({"dry_run": "All"} if dry_run else {}))


@pytest.fixture(scope="module")
def namespace(cluster, r1d_installed) -> str:
    return cluster.new_namespace("crd")


def test_the_crd_is_established_with_its_printer_columns(r1d_installed):
    version = r1d_installed["spec"]["versions"][0]
    assert version["name"] == VERSION
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Phase", "Prefill", "Decode"]


def test_the_charts_crd_is_accepted_too(cluster, r1d_installed):
    # Helm installs charts/*/crds as they are: the same object, so applying it over the manifest's
    # changes nothing and the CRD stays Established.
    assert CHART_CRD.read_bytes() == (ROOT / "manifests" / "crd.yaml").read_bytes()
    before = r1d_installed["metadata"]["generation"]
    after = cluster.install_crd(CHART_CRD)
    assert after["metadata"]["generation"] == before


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted_and_defaulted_like_the_spec_model(cluster, namespace, path: Path):
    doc = yaml.safe_load(path.read_text())
    created = _create(cluster, namespace, doc)
    doc["metadata"]["namespace"] = namespace
    assert created["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def test_a_minimal_spec_is_defaulted_like_the_spec_model(cluster, namespace):
    # Every section left out: the server fills in the same defaults as the pydantic model, nested
    # sub-objects included (a default of {} would be refused by the CEL rules on it).
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "R1Deployment",
           "metadata": {"name": "minimal", "namespace": namespace},
           "spec": {"model": {"source": "/models/r1"}, "prefill": {}, "decode": {}}}
    created = _create(cluster, namespace, doc)
    assert created["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def test_explicit_nulls_of_optional_fields_are_accepted_as_the_loader_accepts_them(cluster, namespace):
    # The server's CEL sees a null optional field as absent (has() is false), like the loader's None.
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["spec"]["prefill"]["replicas"]["initial"] = None
    doc["spec"]["decode"]["kvCacheBlocks"] = None
    load_r1deployment(copy.deepcopy(doc))
    created = _create(cluster, namespace, doc)
    assert created["spec"]["prefill"]["replicas"].get("initial") is None


def test_an_object_is_stored_and_read_back(cluster, namespace):
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["metadata"]["name"] = "stored"
    _create(cluster, namespace, doc, dry_run=False)
    read = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stored")
    assert read["metadata"]["generation"] == 1
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stored")


SERVER_CASES = [row for row in INVALID if Layer.CRD in row.layers]


@pytest.mark.parametrize("row", SERVER_CASES, ids=[row.id for row in SERVER_CASES])
def test_invalid_spec_is_refused_by_the_server_naming_the_field(cluster, namespace, row):
    with pytest.raises(ApiException) as info:
        _create(cluster, namespace, row.doc)
    message = refusal(info.value)
    # 422 for a value the schema or a rule refuses; 400 for a body strict decoding refuses
    # (unknown fields).
    assert info.value.status in (400, 422), message
    assert row.field in message, message


def test_record_figures(cluster, namespace, reliability):
    """Every row and example once more, counted for docs/RELIABILITY.md."""
    wrong = []
    for row in SERVER_CASES:
        try:
            _create(cluster, namespace, row.doc)
            wrong.append(f"{row.id}: accepted")
        except ApiException as exc:
            if row.field not in refusal(exc):
                wrong.append(f"{row.id}: refused without naming {row.field}")
    for path in EXAMPLES:
        try:
            _create(cluster, namespace, yaml.safe_load(path.read_text()))
        except ApiException as exc:
            wrong.append(f"{path.name}: refused: {refusal(exc)}")
    reliability("real-api-server-r1deployments", "bad-input",
                what=f"{len(SERVER_CASES)} invalid R1Deployments of the shared table and the "
                f"{len(EXAMPLES)} examples, created (dry run) on kube-apiserver v1.36 with the CRD "
                "of manifests/: each invalid one refused naming its field, each example accepted",
                requests=len(SERVER_CASES) + len(EXAMPLES), failed=len(wrong),
                failures="; ".join(wrong))
    assert wrong == []
