"""The R1Deployment CRD: structural, documented, defaulted like the spec, and refusing what the spec refuses."""

import copy
from pathlib import Path

import celpy
import kubernetes_validate
import pytest
import yaml

from r1serve.spec import SpecError, load_r1deployment
from r1serve.spec.crd import CONDITION_TYPES, PHASES, build_crd

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASE = {
    "apiVersion": "r1serve.io/v1alpha1",
    "kind": "R1Deployment",
    "metadata": {"name": "r1", "namespace": "default"},
    "spec": {
        "model": {"source": "/models/DeepSeek-R1", "numRoutedExperts": 256},
        "prefill": {"expertParallel": 32, "replicas": {"min": 1, "max": 4}},
        "decode": {"expertParallel": 16, "replicas": {"min": 1, "max": 2}},
        "experts": {"redundant": 32},
    },
}


def changed(*edits):
    """BASE with (dotted.path, value) edits; value None deletes the key."""
    doc = copy.deepcopy(BASE)
    for path, value in edits:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


# (id, document, text the API server's error must contain: the field it names)
INVALID = [
    ("min_above_max", changed(("spec.prefill.replicas", {"min": 3, "max": 2})),
     "spec.prefill.replicas.min"),
    ("initial_outside_bounds", changed(("spec.decode.replicas", {"min": 1, "max": 2, "initial": 5})),
     "spec.decode.replicas.initial"),
    ("negative_redundant", changed(("spec.experts.redundant", -1)), "spec.experts.redundant"),
    ("gpus_per_node_not_a_multiple", changed(("spec.decode.gpusPerRank", 3), ("spec.decode.gpusPerNode", 8)),
     "spec.decode.gpusPerNode"),
    ("experts_not_divisible_prefill", changed(("spec.experts.redundant", 30)),
     "spec.prefill.expertParallel"),
    ("experts_not_divisible_decode", changed(("spec.decode.expertParallel", 20)),
     "spec.decode.expertParallel"),
    ("port_collision", changed(("spec.api", {"grpcPort": 8000, "httpPort": 8000})),
     "spec.api.httpPort"),
    ("reserved_port", changed(("spec.api", {"grpcPort": 6379})), "spec.api.grpcPort"),
    ("port_out_of_range", changed(("spec.api", {"httpPort": 70000})), "spec.api.httpPort"),
    ("unknown_field", changed(("spec.decode.maxBatchToken", 4096)), "spec.decode"),
    ("bad_connector", changed(("spec.kvTransfer", {"connector": "rdma"})),
     "spec.kvTransfer.connector"),
    ("missing_prefill", changed(("spec.prefill", None)), "spec.prefill"),
    ("prefill_when_aggregated", changed(("spec.disaggregation", False)), "spec.prefill"),
    ("ratio_when_aggregated", changed(("spec.disaggregation", False), ("spec.prefill", None),
                                      ("spec.ratio", {"min": 1, "max": 2})), "spec.ratio"),
    ("ratio_min_above_max", changed(("spec.ratio", {"min": 3, "max": 1})), "spec.ratio.min"),
    ("ratio_unreachable", changed(("spec.ratio", {"min": 5, "max": 8})), "spec.ratio.min"),
    ("url_source", changed(("spec.model.source", "hf://deepseek-ai/DeepSeek-R1")),
     "spec.model.source"),
    ("bad_tiny_preset", changed(("spec.model.source", "tiny:Big Model")), "spec.model.source"),
    ("bad_dtype", changed(("spec.model.dtype", "float16")), "spec.model.dtype"),
    ("volume_without_source", changed(("spec.model.volume", {"mountPath": "/models"})),
     "spec.model.volume"),
    ("volume_with_two_sources", changed(("spec.model.volume", {
        "claimName": "weights", "nfs": {"server": "nfs.local", "path": "/exports"}})),
     "spec.model.volume"),
    ("volume_bad_claim_name", changed(("spec.model.volume", {"claimName": "Weights_1"})),
     "spec.model.volume.claimName"),
    ("volume_host_path_dot_dot", changed(("spec.model.volume", {"hostPath": "/nvme/../etc"})),
     "spec.model.volume.hostPath"),
    ("volume_mount_path_trailing_slash",
     changed(("spec.model.volume", {"claimName": "weights", "mountPath": "/models/"})),
     "spec.model.volume.mountPath"),
    ("volume_mount_path_over_tls",
     changed(("spec.model.volume", {"claimName": "weights", "mountPath": "/etc/r1serve/tls"})),
     "spec.model.volume.mountPath"),
    ("volume_absolute_sub_path",
     changed(("spec.model.volume", {"claimName": "weights", "subPath": "/r1"})),
     "spec.model.volume.subPath"),
    ("volume_sub_path_escapes",
     changed(("spec.model.volume", {"claimName": "weights", "subPath": "r1/../.."})),
     "spec.model.volume.subPath"),
    ("volume_nfs_without_server",
     changed(("spec.model.volume", {"nfs": {"path": "/exports"}})), "spec.model.volume.nfs"),
    ("source_outside_volume",
     changed(("spec.model.volume", {"claimName": "weights", "mountPath": "/weights"})),
     "spec.model.source"),
    ("source_outside_default_mount",
     changed(("spec.model.source", "/data/r1"), ("spec.model.volume", {"claimName": "weights"})),
     "spec.model.source"),
    ("source_prefix_is_not_a_parent",
     changed(("spec.model.volume", {"claimName": "weights", "mountPath": "/models/Deep"})),
     "spec.model.source"),
    ("source_escapes_volume", changed(("spec.model.source", "/models/../etc/r1"),
                                      ("spec.model.volume", {"claimName": "weights"})),
     "spec.model.source"),
    ("volume_with_tiny_source", changed(("spec.model.source", "tiny:"),
                                        ("spec.model.volume", {"hostPath": "/nvme/models"})),
     "spec.model.volume"),
    ("kv_usage_above_one", changed(("spec.decode.autoscaling", {"targetKvCacheUsage": 1.5})),
     "spec.decode.autoscaling.targetKvCacheUsage"),
    ("unreachable_decode_target",
     changed(("spec.decode.autoscaling", {"targetOngoingRequests": 5000})),
     "spec.decode.autoscaling.targetOngoingRequests"),
    ("block_size_not_power_of_two", changed(("spec.prefill.blockSize", 48)),
     "spec.prefill.blockSize"),
    ("expert_parallel_too_big", changed(("spec.decode.expertParallel", 2048)),
     "spec.decode.expertParallel"),
    ("kv_cache_too_small", changed(("spec.decode.kvCacheBlocks", 10)), "spec.decode.kvCacheBlocks"),
    ("nccl_on_cpu", changed(("spec.kvTransfer", {"connector": "nccl"}),
                            ("spec.decode.gpusPerRank", 0)), "spec.kvTransfer.connector"),
    ("bad_memory_quantity", changed(("spec.workers", {"resources": {"memory": "4GB"}})),
     "spec.workers.resources.memory"),
    ("bad_toleration_effect",
     changed(("spec.workers", {"tolerations": [{"key": "gpu", "effect": "NoScedule"}]})),
     "spec.workers.tolerations.0.effect"),
    ("toleration_exists_with_value", changed(("spec.workers", {"tolerations": [
        {"key": "gpu", "operator": "Exists", "value": "yes"}]})),
     "spec.workers.tolerations.0.value"),
    ("toleration_equal_without_key", changed(("spec.workers", {"tolerations": [
        {"operator": "Equal", "value": "x"}]})), "spec.workers.tolerations.0.key"),
    ("toleration_empty_key_default_operator", changed(("spec.prefill.workers", {"tolerations": [
        {"key": "", "effect": "NoSchedule"}]})), "spec.prefill.workers.tolerations.0.key"),
    ("toleration_bad_key", changed(("spec.workers", {"tolerations": [
        {"key": "has space", "operator": "Exists"}]})), "spec.workers.tolerations.0.key"),
    ("toleration_bad_value", changed(("spec.workers", {"tolerations": [
        {"key": "gpu", "value": "a b"}]})), "spec.workers.tolerations.0.value"),
    ("toleration_seconds_without_no_execute", changed(("spec.workers", {"tolerations": [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]})),
     "spec.workers.tolerations.0.tolerationSeconds"),
    ("tolerations_too_many", changed(("spec.workers", {"tolerations": [
        {"operator": "Exists"}] * 33})), "spec.workers.tolerations"),
    ("node_selector_bad_key", changed(("spec.workers", {"nodeSelector": {
        "nvidia.com/gpu/product": "H100"}})), "spec.workers.nodeSelector"),
    ("node_selector_prefix_too_long", changed(("spec.workers", {"nodeSelector": {
        "a" * 254 + "/gpu": "x"}})), "spec.workers.nodeSelector"),
    ("node_selector_bad_value", changed(("spec.prefill.workers", {"nodeSelector": {
        "gpu": "H100 80GB"}})), "spec.prefill.workers.nodeSelector.gpu"),
    ("node_selector_too_many", changed(("spec.workers", {"nodeSelector": {
        f"k{i}": "v" for i in range(65)}})), "spec.workers.nodeSelector"),
    ("pod_labels_kuberay_key", changed(("spec.workers", {"podLabels": {
        "ray.io/cluster": "other"}})), "spec.workers.podLabels"),
    ("pod_labels_operator_key", changed(("spec.decode.workers", {"podLabels": {
        "app.kubernetes.io/component": "x"}})), "spec.decode.workers.podLabels"),
    ("pod_labels_r1serve_prefix", changed(("spec.workers", {"podLabels": {
        "r1serve.io/pool": "decode"}})), "spec.workers.podLabels"),
    ("pod_labels_bad_key", changed(("spec.workers", {"podLabels": {"cost center": "ml"}})),
     "spec.workers.podLabels"),
    ("pod_labels_bad_value", changed(("spec.workers", {"podLabels": {"team": "-ml"}})),
     "spec.workers.podLabels.team"),
    ("pod_labels_value_too_long", changed(("spec.workers", {"podLabels": {"team": "m" * 64}})),
     "spec.workers.podLabels.team"),
    ("pod_labels_too_many", changed(("spec.workers", {"podLabels": {
        f"k{i}": "v" for i in range(65)}})), "spec.workers.podLabels"),
    ("empty_auth", changed(("spec.api", {"auth": {}})), "spec.api.auth"),
    ("bad_secret_name", changed(("spec.api", {"tls": {"secretName": "My Secret"}})),
     "spec.api.tls.secretName"),
    ("upgrade_bad_strategy", changed(("spec.upgrade", {"strategy": "Recreate"})),
     "spec.upgrade.strategy"),
    ("upgrade_incremental_without_options",
     changed(("spec.upgrade", {"strategy": "NewClusterWithIncrementalUpgrade"})),
     "spec.upgrade.clusterUpgradeOptions"),
    ("upgrade_options_without_incremental", changed(("spec.upgrade", {"clusterUpgradeOptions": {
        "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30}})),
     "spec.upgrade.clusterUpgradeOptions"),
    ("upgrade_missing_gateway_class", changed(("spec.upgrade", {
        "strategy": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {"stepSizePercent": 5, "intervalSeconds": 30}})),
     "spec.upgrade.clusterUpgradeOptions"),
    ("upgrade_bad_gateway_class", changed(("spec.upgrade", {
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "Istio Gateway", "stepSizePercent": 5, "intervalSeconds": 30}})),
     "spec.upgrade.clusterUpgradeOptions.gatewayClassName"),
    ("upgrade_zero_step", changed(("spec.upgrade", {
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 0, "intervalSeconds": 30}})),
     "spec.upgrade.clusterUpgradeOptions.stepSizePercent"),
    ("upgrade_surge_above_100", changed(("spec.upgrade", {
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30,
            "maxSurgePercent": 150}})),
     "spec.upgrade.clusterUpgradeOptions.maxSurgePercent"),
    ("upgrade_step_above_surge", changed(("spec.upgrade", {
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 50, "intervalSeconds": 30,
            "maxSurgePercent": 20}})),
     "spec.upgrade.clusterUpgradeOptions.stepSizePercent"),
    ("upgrade_zero_interval", changed(("spec.upgrade", {
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 0}})),
     "spec.upgrade.clusterUpgradeOptions.intervalSeconds"),
    ("upgrade_incremental_with_tls", changed(("spec.api", {"tls": {"secretName": "t"}}), (
        "spec.upgrade", {"strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30}})),
     "spec.upgrade.strategy"),
    ("name_too_long", changed(("metadata.name", "r" * 41)), "metadata.name"),
    ("bad_name", changed(("metadata.name", "My_Deploy")), "metadata.name"),
    ("missing_source", changed(("spec.model.source", None)), "spec.model"),
]


def test_examples_and_base_are_accepted(r1d_validator):
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert r1d_validator.errors(yaml.safe_load(path.read_text())) == [], path.name
    assert r1d_validator.errors(BASE) == []


@pytest.mark.parametrize("doc, field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_refused_naming_the_field(r1d_validator, doc, field):
    errors = r1d_validator.errors(doc)
    assert errors, "accepted by the CRD"
    text = "\n".join(errors).replace("[", ".").replace("]", "")
    assert field in text, text
    # The same document is refused by the spec model too: the two layers agree.
    with pytest.raises(SpecError):
        load_r1deployment(doc)


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
    doc = changed(("spec.model.source", source), ("spec.model.volume", volume))
    assert r1d_validator.errors(doc) == []
    loaded = load_r1deployment(doc)
    assert r1d_validator.defaulted(doc)["spec"] == loaded.to_manifest()["spec"]
    assert loaded.spec.model.volume.mount_path == volume.get("mountPath", "/models")


def test_incremental_upgrade_is_accepted_and_defaulted_alike_by_both_layers(r1d_validator):
    doc = changed(("spec.upgrade", {"strategy": "NewClusterWithIncrementalUpgrade",
                                    "clusterUpgradeOptions": {"gatewayClassName": "istio",
                                                              "stepSizePercent": 5,
                                                              "intervalSeconds": 30}}))
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
    doc = changed(("spec.workers", workers), ("spec.decode.workers", workers))
    assert r1d_validator.errors(doc) == []
    assert r1d_validator.defaulted(doc)["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def test_the_table_is_big_enough():
    assert len(INVALID) >= 10


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_defaults_equal_the_spec_defaults(r1d_validator, path):
    doc = yaml.safe_load(path.read_text())
    assert r1d_validator.defaulted(doc)["spec"] == load_r1deployment(doc).to_manifest()["spec"]


def test_minimal_spec_defaults_equal_the_spec_defaults(r1d_validator):
    doc = changed(("spec.prefill", {}), ("spec.decode", {}), ("spec.experts", None),
                  ("spec.model", {"source": "/models/r1"}))
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
