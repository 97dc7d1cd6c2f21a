"""Tests of the R1Deployment spec model: examples, defaults, round trips, merging and schema."""

import copy
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from r1serve.spec import (
    API_VERSION,
    KIND,
    Metadata,
    R1Deployment,
    R1DeploymentSpec,
    SpecError,
    load_r1deployment,
    loads_r1deployment,
)
from r1serve.spec.pool import DecodePool, PrefillPool
from r1serve.spec.sections import ModelSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

MINIMAL = {
    "apiVersion": API_VERSION,
    "kind": KIND,
    "metadata": {"name": "r1"},
    "spec": {
        "model": {"source": "/models/DeepSeek-R1"},
        "prefill": {},
        "decode": {},
    },
}


@pytest.mark.parametrize("name", ["tiny.yaml", "r1-production.yaml"])
def test_examples_load_and_round_trip(name):
    deployment = load_r1deployment(EXAMPLES / name)
    manifest = deployment.to_manifest()
    assert load_r1deployment(manifest) == deployment
    # The manifest is plain YAML-serialisable data, as kubectl apply needs.
    assert loads_r1deployment(yaml.safe_dump(manifest)) == deployment
    assert load_r1deployment(yaml.safe_dump(manifest)) == deployment  # YAML text, not a path


def test_tiny_example_runs_on_cpu():
    tiny = load_r1deployment(EXAMPLES / "tiny.yaml")
    assert tiny.spec.model.is_tiny
    assert tiny.spec.model.tiny_preset == "default"
    assert all(p.gpus_per_rank == 0 for p in tiny.spec.active_pools().values())
    assert tiny.spec.kv_transfer.connector != "nccl"


def test_production_example_splits_experts_evenly():
    prod = load_r1deployment(EXAMPLES / "r1-production.yaml")
    total = prod.spec.model.num_routed_experts + prod.spec.experts.redundant
    assert total == 288
    assert {p.expert_parallel for p in prod.spec.active_pools().values()} == {32, 144}
    assert all(total % p.expert_parallel == 0 for p in prod.spec.active_pools().values())
    assert prod.spec.model.tiny_preset is None


def test_model_volume_of_the_production_example_and_its_defaults():
    prod = load_r1deployment(EXAMPLES / "r1-production.yaml").spec.model
    assert (prod.volume.claim_name, prod.volume.mount_path) == ("deepseek-r1-weights", "/models")
    assert prod.source.startswith(prod.volume.mount_path + "/")
    host = ModelSpec.model_validate({"source": "/models", "volume": {
        "hostPath": "/mnt/nvme/models", "subPath": "DeepSeek-R1"}})
    assert (host.volume.mount_path, host.volume.sub_path, host.volume.claim_name) == (
        "/models", "DeepSeek-R1", None)
    assert load_r1deployment(MINIMAL).spec.model.volume is None
    assert load_r1deployment(EXAMPLES / "tiny.yaml").spec.model.volume is None


def test_defaults_of_a_minimal_spec():
    d = load_r1deployment(MINIMAL)
    assert d.metadata.namespace == "default"
    assert d.served_model_name == "r1"
    m = d.spec.model
    assert (m.max_model_len, m.dtype, m.num_routed_experts) == (32768, "auto", None)
    assert d.spec.disaggregation is True
    for pool in (d.spec.prefill, d.spec.decode):
        assert (pool.replicas.min, pool.replicas.max, pool.replicas.initial) == (1, 1, None)
        assert pool.replicas.effective_initial == 1
        assert (pool.expert_parallel, pool.gpus_per_rank, pool.block_size) == (1, 1, 64)
        assert (pool.max_batch_tokens, pool.max_running_requests) == (8192, 256)
        assert pool.max_queued_requests == 1024 and pool.kv_cache_blocks is None
        assert pool.autoscaling.upscale_delay_seconds == 30
        assert pool.autoscaling.downscale_delay_seconds == 600
    assert d.spec.prefill.autoscaling.target_queued_tokens == 32768
    assert d.spec.decode.autoscaling.target_ongoing_requests == 128
    assert d.spec.decode.autoscaling.target_kv_cache_usage == 0.8
    assert (d.spec.experts.redundant, d.spec.experts.rebalance_interval_seconds) == (0, None)
    assert (d.spec.kv_transfer.connector, d.spec.kv_transfer.timeout_seconds) == ("auto", 30)
    assert (d.spec.api.grpc_port, d.spec.api.http_port) == (9000, 8000)
    assert d.spec.api.auth is None and d.spec.api.tls is None and d.spec.ratio is None


def test_tls_files_resolve_to_the_given_paths_or_the_mounted_secret():
    from r1serve.spec import ApiTLS

    files = ApiTLS.model_validate({"certFile": "/certs/c.pem", "keyFile": "/certs/k.pem"})
    assert (files.cert_path, files.key_path) == ("/certs/c.pem", "/certs/k.pem")
    secret = ApiTLS.model_validate({"secretName": "api-tls"})
    assert (secret.cert_path, secret.key_path) == ("/etc/r1serve/tls/tls.crt", "/etc/r1serve/tls/tls.key")


def test_manifest_is_camel_case_with_defaults_filled():
    manifest = load_r1deployment(MINIMAL).to_manifest()
    assert manifest["apiVersion"] == API_VERSION and manifest["kind"] == KIND
    decode = manifest["spec"]["decode"]
    assert decode["maxRunningRequests"] == 256
    assert decode["autoscaling"]["targetKvCacheUsage"] == 0.8
    assert manifest["spec"]["kvTransfer"] == {"connector": "auto", "timeoutSeconds": 30.0}
    assert "status" not in manifest


def test_kubectl_get_output_can_be_reapplied():
    doc = copy.deepcopy(MINIMAL)
    doc["metadata"].update(
        uid="0b9f", resourceVersion="123", generation=3, creationTimestamp="2025-01-01T00:00:00Z",
        managedFields=[{"manager": "kubectl"}], finalizers=["x"],
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"},
    )
    doc["status"] = {"phase": "Ready", "observedGeneration": 3, "conditions": []}
    assert load_r1deployment(doc).spec == load_r1deployment(MINIMAL).spec


def test_multi_document_file_uses_first_r1deployment(tmp_path):
    other = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}}
    second = copy.deepcopy(MINIMAL)
    second["metadata"]["name"] = "second"
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all([other, MINIMAL, second]))
    assert load_r1deployment(path).metadata.name == "r1"
    assert load_r1deployment(str(path)).metadata.name == "r1"


def test_multi_document_file_without_r1deployment(tmp_path):
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump_all([{"kind": "Service"}, {"kind": "ConfigMap"}]))
    with pytest.raises(SpecError, match="Service, ConfigMap"):
        load_r1deployment(path)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml"):
        load_r1deployment(tmp_path / "nope.yaml")


def test_all_problems_are_reported_together():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["prefill"] = {"replicas": {"min": 3, "max": 2}, "blockSize": 100}
    doc["spec"]["decode"] = {"maxRunningRequests": 0}
    with pytest.raises(SpecError) as info:
        load_r1deployment(doc)
    assert isinstance(info.value, ValueError)
    paths = [p.split(":")[0] for p in info.value.problems]
    assert paths == ["spec.prefill.replicas.min", "spec.prefill.blockSize",
                     "spec.decode.maxRunningRequests"]


def test_python_construction_by_name_and_frozen():
    d = R1Deployment(
        metadata=Metadata(name="r1"),
        spec=R1DeploymentSpec(
            model=ModelSpec(source="tiny:small", max_model_len=1024),
            prefill=PrefillPool(expert_parallel=2, gpus_per_rank=0),
            decode=DecodePool(expert_parallel=2, gpus_per_rank=0),
        ),
    )
    assert d.spec.model.tiny_preset == "small"
    assert load_r1deployment(d.to_manifest()) == d
    with pytest.raises(pydantic.ValidationError):
        d.spec.model.max_model_len = 4  # type: ignore[misc]


def test_aggregated_mode_uses_only_decode():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["disaggregation"] = False
    del doc["spec"]["prefill"]
    d = load_r1deployment(doc)
    assert list(d.spec.active_pools()) == ["decode"]
    assert d.spec.workers_for("prefill") == d.spec.workers_for("decode")


def test_pool_workers_override_shared_workers():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["workers"] = {
        "image": "img:1", "nodeSelector": {"pool": "gpu", "zone": "a"},
        "podLabels": {"team": "ml", "tier": "serve"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "resources": {"cpu": 8, "memory": "64Gi"}, "shmSize": "16Gi",
    }
    doc["spec"]["decode"] = {"workers": {
        "nodeSelector": {"zone": "b"}, "podLabels": {"tier": "decode"}, "tolerations": [],
        "resources": {"cpu": "16"}}}
    d = load_r1deployment(doc)
    decode = d.spec.workers_for("decode")
    assert decode.image == "img:1" and decode.shm_size == "16Gi"
    assert decode.node_selector == {"pool": "gpu", "zone": "b"}
    assert decode.pod_labels == {"team": "ml", "tier": "decode"}
    assert decode.tolerations == []
    assert (decode.resources.cpu, decode.resources.memory) == ("16", "64Gi")
    prefill = d.spec.workers_for("prefill")
    assert prefill.node_selector == {"pool": "gpu", "zone": "a"}
    assert prefill.pod_labels == {"team": "ml", "tier": "serve"}
    assert prefill.resources.cpu == "8"  # YAML ints become Kubernetes quantity strings
    assert prefill.tolerations == [{"key": "gpu", "operator": "Exists"}]


def test_merged_labels_may_exceed_the_bound_on_each_map():
    # The bound on each map only caps the cost of the CRD's rules; a pool adds to the shared ones.
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["workers"] = {"podLabels": {f"shared-{i}": "x" for i in range(40)}}
    doc["spec"]["decode"] = {"workers": {"podLabels": {f"decode-{i}": "x" for i in range(40)}}}
    assert len(load_r1deployment(doc).spec.workers_for("decode").pod_labels) == 80


def _walk_properties(schema, node, where):
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].split("/")[-1]]
    for key in ("anyOf", "allOf"):
        for sub in node.get(key, []):
            yield from _walk_properties(schema, sub, where)
    for name, prop in node.get("properties", {}).items():
        yield f"{where}.{name}", prop
        yield from _walk_properties(schema, prop, f"{where}.{name}")


def test_every_field_has_a_description():
    schema = R1Deployment.model_json_schema(by_alias=True)
    props = list(_walk_properties(schema, schema, ""))
    assert len(props) > 60
    missing = [path for path, prop in props if not prop.get("description")]
    assert missing == []
    assert "maxBatchTokens" in schema["$defs"]["PrefillPool"]["properties"]


def test_spec_imports_no_heavy_runtime():
    code = ("import sys, r1serve.spec; "
            "bad = [m for m in ('torch', 'ray', 'kubernetes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
