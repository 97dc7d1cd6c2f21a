"""Invalid R1Deployments: each error names the camelCase YAML path and the offending value."""

import copy

import pytest

from r1serve.spec import SpecError, load_r1deployment

BASE = {
    "apiVersion": "r1serve.io/v1alpha1",
    "kind": "R1Deployment",
    "metadata": {"name": "r1"},
    "spec": {
        "model": {"source": "/models/DeepSeek-R1", "numRoutedExperts": 256},
        "prefill": {"expertParallel": 32, "replicas": {"min": 1, "max": 4}},
        "decode": {"expertParallel": 16, "replicas": {"min": 1, "max": 2}},
        "experts": {"redundant": 32},
    },
}


def _set(doc, path, value):
    *parents, last = path.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[last] = value


def _delete(doc, path):
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    del doc[last]


def changed(**changes):
    """BASE with dotted-path changes applied; a value of DELETE removes the key."""
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        path = path.replace("__", ".")
        if value is DELETE:
            _delete(doc, path)
        else:
            _set(doc, path, value)
    return doc


DELETE = object()

CASES = [
    ("min_above_max", changed(spec__prefill__replicas={"min": 3, "max": 2}),
     ["spec.prefill.replicas.min", "max (2)", "(got 3)"]),
    ("negative_redundant", changed(spec__experts__redundant=-1),
     ["spec.experts.redundant", "(got -1)"]),
    ("gpus_per_node_not_a_multiple", changed(spec__prefill__gpusPerRank=3, spec__prefill__gpusPerNode=8),
     ["spec.prefill.gpusPerNode", "multiple of gpusPerRank (3)", "(got 8)"]),
    ("duplicate_ports", changed(spec__api={"grpcPort": 8000, "httpPort": 8000}),
     ["spec.api.httpPort", "grpcPort", "(got 8000)"]),
    ("reserved_port", changed(spec__api={"grpcPort": 6379}),
     ["spec.api.grpcPort", "Ray GCS", "(got 6379)"]),
    ("port_out_of_range", changed(spec__api={"httpPort": 70000}),
     ["spec.api.httpPort", "(got 70000)"]),
    ("typo_unknown_field", changed(spec__decode__maxBatchToken=4096),
     ["spec.decode.maxBatchToken", "unknown field", "did you mean 'maxBatchTokens'"]),
    ("typo_top_level_spec", changed(spec__kvTransfers={"connector": "nccl"}),
     ["spec.kvTransfers", "did you mean 'kvTransfer'"]),
    ("bad_name", changed(metadata__name="My_Deploy"),
     ["metadata.name", "DNS-1035", "(got 'My_Deploy')"]),
    ("name_too_long", changed(metadata__name="r" * 41),
     ["metadata.name", "at most 40"]),
    ("bad_namespace", changed(metadata__namespace="Prod"),
     ["metadata.namespace", "(got 'Prod')"]),
    ("bad_connector", changed(spec__kvTransfer={"connector": "rdma"}),
     ["spec.kvTransfer.connector", "(got 'rdma')"]),
    ("experts_not_divisible", changed(spec__experts__redundant=30),
     ["spec.prefill.expertParallel", "286", "experts.redundant: 32", "(got 32)"]),
    ("experts_not_divisible_decode", changed(spec__decode__expertParallel=20),
     ["spec.decode.expertParallel", "(got 20)"]),
    ("wrong_kind", changed(kind="Deployment"), ["kind", "'R1Deployment'", "(got 'Deployment')"]),
    ("wrong_api_version", changed(apiVersion="r1serve.io/v1"),
     ["apiVersion", "r1serve.io/v1alpha1", "(got 'r1serve.io/v1')"]),
    ("missing_api_version", changed(apiVersion=DELETE), ["apiVersion: required"]),
    ("initial_above_max", changed(spec__decode__replicas={"min": 1, "max": 2, "initial": 5}),
     ["spec.decode.replicas.initial", "(got 5)"]),
    ("ratio_min_above_max", changed(spec__ratio={"min": 3, "max": 1}),
     ["spec.ratio.min", "(got 3.0)"]),
    ("ratio_unreachable", changed(spec__ratio={"min": 5, "max": 8}),
     ["spec.ratio.min", "highest reachable ratio 4", "(got 5.0)"]),
    ("missing_decode", changed(spec__decode=DELETE), ["spec.decode: required field is missing"]),
    ("missing_prefill_when_disaggregated", changed(spec__prefill=DELETE),
     ["spec.prefill: required when disaggregation is true"]),
    ("prefill_when_aggregated", changed(spec__disaggregation=False),
     ["spec.prefill: must be omitted"]),
    ("missing_source", changed(spec__model__source=DELETE),
     ["spec.model.source: required field is missing"]),
    ("url_source", changed(spec__model__source="hf://deepseek-ai/DeepSeek-R1"),
     ["spec.model.source", "(got 'hf://deepseek-ai/DeepSeek-R1')"]),
    ("bad_tiny_preset", changed(spec__model__source="tiny:Big Model"),
     ["spec.model.source", "tiny preset"]),
    ("volume_without_source", changed(spec__model__volume={"mountPath": "/models"}),
     ["spec.model.volume: set one of claimName, hostPath or nfs"]),
    ("volume_with_two_sources",
     changed(spec__model__volume={"claimName": "weights", "hostPath": "/nvme/models"}),
     ["spec.model.volume.hostPath", "only one of", "claimName and hostPath", "(got '/nvme/models')"]),
    ("volume_bad_claim_name", changed(spec__model__volume={"claimName": "Weights_1"}),
     ["spec.model.volume.claimName", "(got 'Weights_1')"]),
    ("volume_relative_host_path", changed(spec__model__volume={"hostPath": "nvme/models"}),
     ["spec.model.volume.hostPath", "absolute path", "(got 'nvme/models')"]),
    ("volume_mount_path_trailing_slash",
     changed(spec__model__volume={"claimName": "weights", "mountPath": "/models/"}),
     ["spec.model.volume.mountPath", "trailing '/'", "(got '/models/')"]),
    ("volume_mount_path_over_shm",
     changed(spec__model__volume={"claimName": "weights", "mountPath": "/dev/shm"}),
     ["spec.model.volume.mountPath", "shared memory", "(got '/dev/shm')"]),
    ("volume_sub_path_escapes",
     changed(spec__model__volume={"claimName": "weights", "subPath": "r1/../../etc"}),
     ["spec.model.volume.subPath", "'..'", "(got 'r1/../../etc')"]),
    ("volume_nfs_relative_path",
     changed(spec__model__volume={"nfs": {"server": "nfs.local", "path": "exports"}}),
     ["spec.model.volume.nfs.path", "absolute path", "(got 'exports')"]),
    ("source_outside_volume",
     changed(spec__model__volume={"claimName": "weights", "mountPath": "/weights"}),
     ["spec.model.source", "model.volume.mountPath (/weights)", "(got '/models/DeepSeek-R1')"]),
    ("source_prefix_is_not_a_parent",
     changed(spec__model__volume={"claimName": "weights", "mountPath": "/models/Deep"}),
     ["spec.model.source", "model.volume.mountPath (/models/Deep)"]),
    ("source_escapes_volume", changed(spec__model__source="/models/../etc/r1",
                                      spec__model__volume={"claimName": "weights"}),
     ["spec.model.source", "(got '/models/../etc/r1')"]),
    ("volume_with_tiny_source", changed(spec__model__source="tiny:",
                                        spec__model__volume={"claimName": "weights"}),
     ["spec.model.volume: must be omitted with a 'tiny:' source"]),
    ("zero_max_model_len", changed(spec__model__maxModelLen=0),
     ["spec.model.maxModelLen", "(got 0)"]),
    ("bad_dtype", changed(spec__model__dtype="float16"),
     ["spec.model.dtype", "(got 'float16')"]),
    ("kv_usage_above_one", changed(spec__decode__autoscaling={"targetKvCacheUsage": 1.5}),
     ["spec.decode.autoscaling.targetKvCacheUsage", "(got 1.5)"]),
    ("unreachable_decode_target",
     changed(spec__decode__autoscaling={"targetOngoingRequests": 5000}),
     ["spec.decode.autoscaling.targetOngoingRequests", "(got 5000)"]),
    ("negative_delay", changed(spec__prefill__autoscaling={"upscaleDelaySeconds": -1}),
     ["spec.prefill.autoscaling.upscaleDelaySeconds", "(got -1)"]),
    ("zero_target_tokens", changed(spec__prefill__autoscaling={"targetQueuedTokens": 0}),
     ["spec.prefill.autoscaling.targetQueuedTokens", "(got 0)"]),
    ("block_size_not_power_of_two", changed(spec__prefill__blockSize=48),
     ["spec.prefill.blockSize", "power of two", "(got 48)"]),
    ("expert_parallel_zero", changed(spec__decode__expertParallel=0),
     ["spec.decode.expertParallel", "(got 0)"]),
    ("expert_parallel_too_big", changed(spec__decode__expertParallel=2048),
     ["spec.decode.expertParallel", "(got 2048)"]),
    ("kv_cache_too_small", changed(spec__decode__kvCacheBlocks=10),
     ["spec.decode.kvCacheBlocks", "maxModelLen (32768)", "(got 10)"]),
    ("nccl_on_cpu", changed(spec__kvTransfer={"connector": "nccl"}, spec__decode__gpusPerRank=0),
     ["spec.kvTransfer.connector", "decode.gpusPerRank", "(got 'nccl')"]),
    ("max_replicas_zero", changed(spec__prefill__replicas={"min": 0, "max": 0}),
     ["spec.prefill.replicas.max", "(got 0)"]),
    ("bad_memory_quantity", changed(spec__workers={"resources": {"memory": "4GB"}}),
     ["spec.workers.resources.memory", "(got '4GB')"]),
    ("bad_toleration_effect",
     changed(spec__workers={"tolerations": [{"key": "gpu", "effect": "NoScedule"}]}),
     ["spec.workers.tolerations[0].effect", "(got 'NoScedule')"]),
    ("non_string_node_selector", changed(spec__decode__workers={"nodeSelector": {"gpu": 1}}),
     ["spec.decode.workers.nodeSelector.gpu", "(got 1)"]),
    ("node_selector_bad_key",
     changed(spec__workers={"nodeSelector": {"nvidia.com/gpu/product": "H100"}}),
     ["spec.workers.nodeSelector: key must be a Kubernetes label key",
      "(got 'nvidia.com/gpu/product')"]),
    ("node_selector_prefix_too_long",
     changed(spec__workers={"nodeSelector": {"a" * 254 + "/gpu": "x"}}),
     ["spec.workers.nodeSelector: key must be a Kubernetes label key", "at most 253"]),
    ("node_selector_bad_value",
     changed(spec__prefill__workers={"nodeSelector": {"gpu": "H100 80GB"}}),
     ["spec.prefill.workers.nodeSelector.gpu", "label value", "(got 'H100 80GB')"]),
    ("node_selector_too_many",
     changed(spec__workers={"nodeSelector": {f"k{i}": "v" for i in range(65)}}),
     ["spec.workers.nodeSelector: must have at most 64 entries, not 65"]),
    ("pod_labels_kuberay_key", changed(spec__workers={"podLabels": {"ray.io/cluster": "other"}}),
     ["spec.workers.podLabels: key is reserved for r1serve and KubeRay", "ray.io/*",
      "(got 'ray.io/cluster')"]),
    ("pod_labels_operator_key",
     changed(spec__decode__workers={"podLabels": {"app.kubernetes.io/component": "x"}}),
     ["spec.decode.workers.podLabels: key is reserved", "(got 'app.kubernetes.io/component')"]),
    ("pod_labels_r1serve_prefix",
     changed(spec__workers={"podLabels": {"r1serve.io/pool": "decode"}}),
     ["spec.workers.podLabels: key is reserved", "(got 'r1serve.io/pool')"]),
    ("pod_labels_bad_key", changed(spec__workers={"podLabels": {"cost center": "ml"}}),
     ["spec.workers.podLabels: key must be a Kubernetes label key", "(got 'cost center')"]),
    ("pod_labels_bad_value", changed(spec__workers={"podLabels": {"team": "-ml"}}),
     ["spec.workers.podLabels.team", "label value", "(got '-ml')"]),
    ("pod_labels_value_too_long", changed(spec__workers={"podLabels": {"team": "m" * 64}}),
     ["spec.workers.podLabels.team", "at most 63"]),
    ("pod_labels_too_many",
     changed(spec__workers={"podLabels": {f"k{i}": "v" for i in range(65)}}),
     ["spec.workers.podLabels: must have at most 64 entries, not 65"]),
    ("toleration_exists_with_value",
     changed(spec__workers={"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]}),
     ["spec.workers.tolerations[0].value", "empty when operator is Exists", "(got 'yes')"]),
    ("toleration_equal_without_key",
     changed(spec__workers={"tolerations": [{"operator": "Equal", "value": "x"}]}),
     ["spec.workers.tolerations[0].key: required unless operator is Exists"]),
    ("toleration_empty_key_default_operator",
     changed(spec__prefill__workers={"tolerations": [{"key": "", "effect": "NoSchedule"}]}),
     ["spec.prefill.workers.tolerations[0].key: required unless operator is Exists", "(got '')"]),
    ("toleration_bad_key",
     changed(spec__workers={"tolerations": [{"key": "has space", "operator": "Exists"}]}),
     ["spec.workers.tolerations[0].key", "label key", "(got 'has space')"]),
    ("toleration_bad_value",
     changed(spec__workers={"tolerations": [{"key": "gpu", "value": "a b"}]}),
     ["spec.workers.tolerations[0].value", "label value", "(got 'a b')"]),
    ("toleration_seconds_without_no_execute", changed(spec__workers={"tolerations": [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]}),
     ["spec.workers.tolerations[0].tolerationSeconds", "effect: NoExecute", "(got 5)"]),
    ("tolerations_too_many", changed(spec__workers={"tolerations": [{"operator": "Exists"}] * 33}),
     ["spec.workers.tolerations: must have at most 32 entries, not 33"]),
    ("empty_auth", changed(spec__api={"auth": {}}), ["spec.api.auth: set at least one"]),
    ("bad_secret_name", changed(spec__api={"tls": {"secretName": "My Secret"}}),
     ["spec.api.tls.secretName", "(got 'My Secret')"]),
    ("empty_tls", changed(spec__api={"tls": {}}),
     ["spec.api.tls: set secretName, or certFile and keyFile"]),
    ("tls_secret_and_files", changed(spec__api={"tls": {"secretName": "t", "certFile": "/c",
                                                        "keyFile": "/k"}}),
     ["spec.api.tls.secretName", "not both", "(got 't')"]),
    ("tls_cert_without_key", changed(spec__api={"tls": {"certFile": "/c"}}),
     ["spec.api.tls.keyFile: required with certFile"]),
    ("tls_key_without_cert", changed(spec__api={"tls": {"keyFile": "/k"}}),
     ["spec.api.tls.certFile: required with keyFile"]),
    ("tls_relative_key", changed(spec__api={"tls": {"certFile": "/c", "keyFile": "k.pem"}}),
     ["spec.api.tls.keyFile", "absolute path", "(got 'k.pem')"]),
    ("internal_grpc_port", changed(spec__api={"httpPort": 9001}),
     ["spec.api.httpPort", "plaintext gRPC proxy behind the TLS front", "(got 9001)"]),
    ("upgrade_bad_strategy", changed(spec__upgrade={"strategy": "Recreate"}),
     ["spec.upgrade.strategy", "'NewClusterWithIncrementalUpgrade'", "(got 'Recreate')"]),
    ("upgrade_incremental_without_options",
     changed(spec__upgrade={"strategy": "NewClusterWithIncrementalUpgrade"}),
     ["spec.upgrade.clusterUpgradeOptions: required when strategy is "
      "NewClusterWithIncrementalUpgrade"]),
    ("upgrade_options_without_incremental", changed(spec__upgrade={"clusterUpgradeOptions": {
        "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30}}),
     ["spec.upgrade.clusterUpgradeOptions", "only allowed with strategy "
      "NewClusterWithIncrementalUpgrade (strategy is NewCluster)", "(got {'gatewayClassName'"]),
    ("upgrade_missing_gateway_class", changed(spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {"stepSizePercent": 5, "intervalSeconds": 30}}),
     ["spec.upgrade.clusterUpgradeOptions.gatewayClassName: required field is missing"]),
    ("upgrade_bad_gateway_class", changed(spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "Istio Gateway", "stepSizePercent": 5, "intervalSeconds": 30}}),
     ["spec.upgrade.clusterUpgradeOptions.gatewayClassName", "(got 'Istio Gateway')"]),
    ("upgrade_zero_step", changed(spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 0, "intervalSeconds": 30}}),
     ["spec.upgrade.clusterUpgradeOptions.stepSizePercent", "(got 0)"]),
    ("upgrade_surge_above_100", changed(spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30,
            "maxSurgePercent": 150}}),
     ["spec.upgrade.clusterUpgradeOptions.maxSurgePercent", "(got 150)"]),
    ("upgrade_step_above_surge", changed(spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 50, "intervalSeconds": 30,
            "maxSurgePercent": 20}}),
     ["spec.upgrade.clusterUpgradeOptions.stepSizePercent", "maxSurgePercent (20)",
      "(got 50)"]),
    ("upgrade_zero_interval", changed(spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 0}}),
     ["spec.upgrade.clusterUpgradeOptions.intervalSeconds", "(got 0)"]),
    ("upgrade_incremental_with_tls", changed(spec__api={"tls": {"secretName": "t"}}, spec__upgrade={
        "strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30}}),
     ["spec.upgrade.strategy", "api.tls", "(got 'NewClusterWithIncrementalUpgrade')"]),
    ("snake_case_input_reported_in_camel_case", changed(spec__prefill__max_batch_tokens=0),
     ["spec.prefill.maxBatchTokens", "(got 0)"]),
    ("missing_metadata", changed(metadata=DELETE), ["metadata: required field is missing"]),
    ("pool_not_a_mapping", changed(spec__decode=[1, 2]), ["spec.decode: must be a mapping"]),
]


@pytest.mark.parametrize("doc, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_spec_names_field_and_value(doc, expected):
    with pytest.raises(SpecError) as info:
        load_r1deployment(doc)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


YAML_CASES = [
    ("syntax_error", ("apiVersion: r1serve.io/v1alpha1\nkind: R1Deployment\nmetadata:\n"
     "  name: r1\n spec: [unclosed\n"), ["line 5", "invalid YAML"]),
    ("duplicate_key", ("apiVersion: r1serve.io/v1alpha1\nkind: R1Deployment\n"
     "metadata: {name: a}\nmetadata: {name: b}\n"), ["line 4", "duplicate key 'metadata'"]),
    ("empty_file", "# nothing here\n", ["no document"]),
    ("not_a_mapping", "- just\n- a list\n", ["must be a mapping"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in YAML_CASES],
                         ids=[c[0] for c in YAML_CASES])
def test_invalid_yaml_names_file_and_line(tmp_path, text, expected):
    path = tmp_path / "r1.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_r1deployment(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_base_case_is_valid():
    assert load_r1deployment(BASE).metadata.name == "r1"
