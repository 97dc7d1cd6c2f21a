"""Invalid R1Deployments, one table for every layer that must refuse them: the spec model (pydantic, tests/spec),
the CRD's schema and CEL rules (offline in tests/operator, on a real API server in tests/cluster).

Each row names the field every refusing layer must name, as the API server writes paths
(`spec.workers.tolerations[0].key`), and more text the spec model's message must contain (the value,
the reason). A later spec field adds its rows here, and all three layers test them.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Any


class Layer(enum.Flag):
    SPEC = enum.auto()  # load_r1deployment raises SpecError
    CRD = enum.auto()  # the CRD refuses it: offline schema + CEL, and a real API server


SPEC, CRD = Layer.SPEC, Layer.CRD
BOTH = SPEC | CRD


@dataclass(frozen=True)
class Invalid:
    id: str
    doc: dict[str, Any]
    field: str
    says: tuple[str, ...]
    layers: Layer


def case(id: str, doc: dict[str, Any], field: str, *says: str, layers: Layer = BOTH) -> Invalid:
    return Invalid(id, doc, field, says, layers)


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
DELETE = object()


def changed(**changes: Any) -> dict[str, Any]:
    """BASE with changes at double-underscore paths (spec__decode__replicas=...); DELETE removes a key."""
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


def incremental(**options: Any) -> dict[str, Any]:
    """spec.upgrade with the incremental strategy and valid options, some changed (DELETE removes)."""
    merged = {"gatewayClassName": "istio", "stepSizePercent": 5, "intervalSeconds": 30, **options}
    return {"strategy": "NewClusterWithIncrementalUpgrade",
            "clusterUpgradeOptions": {k: v for k, v in merged.items() if v is not DELETE}}


INVALID = [
    case("min_above_max", changed(spec__prefill__replicas={"min": 3, "max": 2}),
         "spec.prefill.replicas.min", "max (2)", "(got 3)"),
    case("negative_redundant", changed(spec__experts__redundant=-1), "spec.experts.redundant",
         "(got -1)"),
    case("gpus_per_node_not_a_multiple",
         changed(spec__prefill__gpusPerRank=3, spec__prefill__gpusPerNode=8),
         "spec.prefill.gpusPerNode", "multiple of gpusPerRank (3)", "(got 8)"),
    case("gpus_per_node_not_a_multiple_decode",
         changed(spec__decode__gpusPerRank=3, spec__decode__gpusPerNode=8),
         "spec.decode.gpusPerNode"),
    case("duplicate_ports", changed(spec__api={"grpcPort": 8000, "httpPort": 8000}),
         "spec.api.httpPort", "grpcPort", "(got 8000)"),
    case("reserved_port", changed(spec__api={"grpcPort": 6379}), "spec.api.grpcPort", "Ray GCS",
         "(got 6379)"),
    case("port_out_of_range", changed(spec__api={"httpPort": 70000}), "spec.api.httpPort",
         "(got 70000)"),
    case("typo_unknown_field", changed(spec__decode__maxBatchToken=4096),
         "spec.decode.maxBatchToken", "unknown field", "did you mean 'maxBatchTokens'"),
    case("typo_top_level_spec", changed(spec__kvTransfers={"connector": "nccl"}),
         "spec.kvTransfers", "did you mean 'kvTransfer'"),
    case("bad_name", changed(metadata__name="My_Deploy"), "metadata.name", "DNS-1035",
         "(got 'My_Deploy')"),
    case("name_too_long", changed(metadata__name="r" * 41), "metadata.name", "at most 40"),
    # the server takes the namespace from the request's path
    case("bad_namespace", changed(metadata__namespace="Prod"), "metadata.namespace", "(got 'Prod')",
         layers=SPEC),
    case("bad_connector", changed(spec__kvTransfer={"connector": "rdma"}),
         "spec.kvTransfer.connector", "(got 'rdma')"),
    case("experts_not_divisible", changed(spec__experts__redundant=30),
         "spec.prefill.expertParallel", "286", "experts.redundant: 32", "(got 32)"),
    case("experts_not_divisible_decode", changed(spec__decode__expertParallel=20),
         "spec.decode.expertParallel", "(got 20)"),
    # the server takes the kind from the request's path
    case("wrong_kind", changed(kind="Deployment"), "kind", "'R1Deployment'", "(got 'Deployment')",
         layers=SPEC),
    # the server takes the version from the request's path
    case("wrong_api_version", changed(apiVersion="r1serve.io/v1"), "apiVersion",
         "r1serve.io/v1alpha1", "(got 'r1serve.io/v1')", layers=SPEC),
    # the server takes the version from the request's path
    case("missing_api_version", changed(apiVersion=DELETE), "apiVersion", "apiVersion: required",
         layers=SPEC),
    case("initial_above_max", changed(spec__decode__replicas={"min": 1, "max": 2, "initial": 5}),
         "spec.decode.replicas.initial", "(got 5)"),
    case("ratio_min_above_max", changed(spec__ratio={"min": 3, "max": 1}), "spec.ratio.min",
         "(got 3.0)"),
    case("ratio_unreachable", changed(spec__ratio={"min": 5, "max": 8}), "spec.ratio.min",
         "highest reachable ratio 4", "(got 5.0)"),
    case("missing_decode", changed(spec__decode=DELETE), "spec.decode",
         "spec.decode: required field is missing"),
    case("missing_prefill_when_disaggregated", changed(spec__prefill=DELETE), "spec.prefill",
         "spec.prefill: required when disaggregation is true"),
    case("prefill_when_aggregated", changed(spec__disaggregation=False), "spec.prefill",
         "spec.prefill: must be omitted"),
    case("missing_source", changed(spec__model__source=DELETE), "spec.model",
         "spec.model.source: required field is missing"),
    case("url_source", changed(spec__model__source="hf://deepseek-ai/DeepSeek-R1"),
         "spec.model.source", "(got 'hf://deepseek-ai/DeepSeek-R1')"),
    case("bad_tiny_preset", changed(spec__model__source="tiny:Big Model"), "spec.model.source",
         "tiny preset"),
    case("volume_without_source", changed(spec__model__volume={"mountPath": "/models"}),
         "spec.model.volume", "spec.model.volume: set one of claimName, hostPath or nfs"),
    case("volume_with_two_sources",
         changed(spec__model__volume={"claimName": "weights", "hostPath": "/nvme/models"}),
         "spec.model.volume", "spec.model.volume.hostPath", "only one of", "claimName and hostPath",
         "(got '/nvme/models')"),
    case("volume_with_claim_and_nfs",
         changed(spec__model__volume={"claimName": "weights",
                                      "nfs": {"server": "nfs.local", "path": "/exports"}}),
         "spec.model.volume"),
    case("volume_bad_claim_name", changed(spec__model__volume={"claimName": "Weights_1"}),
         "spec.model.volume.claimName", "(got 'Weights_1')"),
    case("volume_relative_host_path", changed(spec__model__volume={"hostPath": "nvme/models"}),
         "spec.model.volume.hostPath", "absolute path", "(got 'nvme/models')"),
    case("volume_mount_path_trailing_slash",
         changed(spec__model__volume={"claimName": "weights", "mountPath": "/models/"}),
         "spec.model.volume.mountPath", "trailing '/'", "(got '/models/')"),
    case("volume_mount_path_over_shm",
         changed(spec__model__volume={"claimName": "weights", "mountPath": "/dev/shm"}),
         "spec.model.volume.mountPath", "shared memory", "(got '/dev/shm')"),
    case("volume_sub_path_escapes",
         changed(spec__model__volume={"claimName": "weights", "subPath": "r1/../../etc"}),
         "spec.model.volume.subPath", "'..'", "(got 'r1/../../etc')"),
    case("volume_sub_path_is_a_parent",
         changed(spec__model__volume={"claimName": "weights", "subPath": "r1/../.."}),
         "spec.model.volume.subPath"),
    case("volume_nfs_relative_path",
         changed(spec__model__volume={"nfs": {"server": "nfs.local", "path": "exports"}}),
         "spec.model.volume.nfs.path", "absolute path", "(got 'exports')"),
    case("source_outside_volume",
         changed(spec__model__volume={"claimName": "weights", "mountPath": "/weights"}),
         "spec.model.source", "model.volume.mountPath (/weights)", "(got '/models/DeepSeek-R1')"),
    case("source_prefix_is_not_a_parent",
         changed(spec__model__volume={"claimName": "weights", "mountPath": "/models/Deep"}),
         "spec.model.source", "model.volume.mountPath (/models/Deep)"),
    case("source_escapes_volume",
         changed(spec__model__source="/models/../etc/r1",
                 spec__model__volume={"claimName": "weights"}),
         "spec.model.source", "(got '/models/../etc/r1')"),
    case("volume_with_tiny_source",
         changed(spec__model__source="tiny:", spec__model__volume={"claimName": "weights"}),
         "spec.model.volume", "spec.model.volume: must be omitted with a 'tiny:' source"),
    case("volume_host_path_with_tiny_source",
         changed(spec__model__source="tiny:", spec__model__volume={"hostPath": "/nvme/models"}),
         "spec.model.volume"),
    case("zero_max_model_len", changed(spec__model__maxModelLen=0), "spec.model.maxModelLen",
         "(got 0)"),
    case("bad_dtype", changed(spec__model__dtype="float16"), "spec.model.dtype", "(got 'float16')"),
    case("kv_usage_above_one", changed(spec__decode__autoscaling={"targetKvCacheUsage": 1.5}),
         "spec.decode.autoscaling.targetKvCacheUsage", "(got 1.5)"),
    case("unreachable_decode_target",
         changed(spec__decode__autoscaling={"targetOngoingRequests": 5000}),
         "spec.decode.autoscaling.targetOngoingRequests", "(got 5000)"),
    case("negative_delay", changed(spec__prefill__autoscaling={"upscaleDelaySeconds": -1}),
         "spec.prefill.autoscaling.upscaleDelaySeconds", "(got -1)"),
    case("zero_target_tokens", changed(spec__prefill__autoscaling={"targetQueuedTokens": 0}),
         "spec.prefill.autoscaling.targetQueuedTokens", "(got 0)"),
    case("kernels_unknown", changed(spec__decode__kernels="cuda"), "spec.decode.kernels",
         "'auto', 'torch' or 'triton'"),
    case("triton_kernels_without_gpus", changed(spec__decode__kernels="triton", spec__decode__gpusPerRank=0),
         "spec.decode.kernels", "triton needs GPUs", "gpusPerRank > 0"),
    case("cuda_graphs_not_a_bool", changed(spec__prefill__cudaGraphs="sometimes"), "spec.prefill.cudaGraphs"),
    case("block_size_not_power_of_two", changed(spec__prefill__blockSize=48),
         "spec.prefill.blockSize", "power of two", "(got 48)"),
    case("expert_parallel_zero", changed(spec__decode__expertParallel=0),
         "spec.decode.expertParallel", "(got 0)"),
    case("expert_parallel_too_big", changed(spec__decode__expertParallel=2048),
         "spec.decode.expertParallel", "(got 2048)"),
    case("kv_cache_too_small", changed(spec__decode__kvCacheBlocks=10), "spec.decode.kvCacheBlocks",
         "maxModelLen (32768)", "(got 10)"),
    case("nccl_refused", changed(spec__kvTransfer={"connector": "nccl"}),
         "spec.kvTransfer.connector", "nccl cannot serve elastic pools", "use nixl", "(got 'nccl')"),
    case("gloo_with_gpu_pools", changed(spec__kvTransfer={"connector": "gloo"}),
         "spec.kvTransfer.connector", "gloo moves host memory between pools on CPUs", "(got 'gloo')"),
    case("max_replicas_zero", changed(spec__prefill__replicas={"min": 0, "max": 0}),
         "spec.prefill.replicas.max", "(got 0)"),
    case("bad_memory_quantity", changed(spec__workers={"resources": {"memory": "4GB"}}),
         "spec.workers.resources.memory", "(got '4GB')"),
    case("bad_toleration_effect",
         changed(spec__workers={"tolerations": [{"key": "gpu", "effect": "NoScedule"}]}),
         "spec.workers.tolerations[0].effect", "(got 'NoScedule')"),
    case("non_string_node_selector", changed(spec__decode__workers={"nodeSelector": {"gpu": 1}}),
         "spec.decode.workers.nodeSelector.gpu", "(got 1)"),
    case("node_selector_bad_key",
         changed(spec__workers={"nodeSelector": {"nvidia.com/gpu/product": "H100"}}),
         "spec.workers.nodeSelector",
         "spec.workers.nodeSelector: key must be a Kubernetes label key",
         "(got 'nvidia.com/gpu/product')"),
    case("node_selector_prefix_too_long",
         changed(spec__workers={"nodeSelector": {"a" * 254 + "/gpu": "x"}}),
         "spec.workers.nodeSelector",
         "spec.workers.nodeSelector: key must be a Kubernetes label key", "at most 253"),
    case("node_selector_bad_value",
         changed(spec__prefill__workers={"nodeSelector": {"gpu": "H100 80GB"}}),
         "spec.prefill.workers.nodeSelector.gpu", "label value", "(got 'H100 80GB')"),
    case("node_selector_too_many",
         changed(spec__workers={"nodeSelector": {f"k{i}": "v" for i in range(65)}}),
         "spec.workers.nodeSelector",
         "spec.workers.nodeSelector: must have at most 64 entries, not 65"),
    case("pod_labels_kuberay_key",
         changed(spec__workers={"podLabels": {"ray.io/cluster": "other"}}),
         "spec.workers.podLabels",
         "spec.workers.podLabels: key is reserved for r1serve and KubeRay", "ray.io/*",
         "(got 'ray.io/cluster')"),
    case("pod_labels_operator_key",
         changed(spec__decode__workers={"podLabels": {"app.kubernetes.io/component": "x"}}),
         "spec.decode.workers.podLabels", "spec.decode.workers.podLabels: key is reserved",
         "(got 'app.kubernetes.io/component')"),
    case("pod_labels_r1serve_prefix",
         changed(spec__workers={"podLabels": {"r1serve.io/pool": "decode"}}),
         "spec.workers.podLabels", "spec.workers.podLabels: key is reserved",
         "(got 'r1serve.io/pool')"),
    case("pod_labels_bad_key", changed(spec__workers={"podLabels": {"cost center": "ml"}}),
         "spec.workers.podLabels", "spec.workers.podLabels: key must be a Kubernetes label key",
         "(got 'cost center')"),
    case("pod_labels_bad_value", changed(spec__workers={"podLabels": {"team": "-ml"}}),
         "spec.workers.podLabels.team", "label value", "(got '-ml')"),
    case("pod_labels_value_too_long", changed(spec__workers={"podLabels": {"team": "m" * 64}}),
         "spec.workers.podLabels.team", "at most 63"),
    case("pod_labels_too_many",
         changed(spec__workers={"podLabels": {f"k{i}": "v" for i in range(65)}}),
         "spec.workers.podLabels", "spec.workers.podLabels: must have at most 64 entries, not 65"),
    case("toleration_exists_with_value",
         changed(spec__workers={"tolerations": [{"key": "gpu", "operator": "Exists",
                                                 "value": "yes"}]}),
         "spec.workers.tolerations[0].value", "empty when operator is Exists", "(got 'yes')"),
    case("toleration_equal_without_key",
         changed(spec__workers={"tolerations": [{"operator": "Equal", "value": "x"}]}),
         "spec.workers.tolerations[0].key",
         "spec.workers.tolerations[0].key: required unless operator is Exists"),
    case("toleration_empty_key_default_operator",
         changed(spec__prefill__workers={"tolerations": [{"key": "", "effect": "NoSchedule"}]}),
         "spec.prefill.workers.tolerations[0].key",
         "spec.prefill.workers.tolerations[0].key: required unless operator is Exists", "(got '')"),
    case("toleration_bad_key",
         changed(spec__workers={"tolerations": [{"key": "has space", "operator": "Exists"}]}),
         "spec.workers.tolerations[0].key", "label key", "(got 'has space')"),
    case("toleration_bad_value",
         changed(spec__workers={"tolerations": [{"key": "gpu", "value": "a b"}]}),
         "spec.workers.tolerations[0].value", "label value", "(got 'a b')"),
    case("toleration_seconds_without_no_execute",
         changed(spec__workers={"tolerations": [{"key": "gpu", "operator": "Exists",
                                                 "effect": "NoSchedule", "tolerationSeconds": 5}]}),
         "spec.workers.tolerations[0].tolerationSeconds", "effect: NoExecute", "(got 5)"),
    case("tolerations_too_many",
         changed(spec__workers={"tolerations": [{"operator": "Exists"}] * 33}),
         "spec.workers.tolerations",
         "spec.workers.tolerations: must have at most 32 entries, not 33"),
    case("empty_auth", changed(spec__api={"auth": {}}), "spec.api.auth",
         "spec.api.auth: set at least one"),
    case("bad_secret_name", changed(spec__api={"tls": {"secretName": "My Secret"}}),
         "spec.api.tls.secretName", "(got 'My Secret')"),
    case("empty_tls", changed(spec__api={"tls": {}}), "spec.api.tls",
         "spec.api.tls: set secretName, or certFile and keyFile"),
    case("tls_secret_and_files",
         changed(spec__api={"tls": {"secretName": "t", "certFile": "/c", "keyFile": "/k"}}),
         "spec.api.tls.secretName", "not both", "(got 't')"),
    case("tls_cert_without_key", changed(spec__api={"tls": {"certFile": "/c"}}),
         "spec.api.tls.keyFile", "spec.api.tls.keyFile: required with certFile"),
    case("tls_key_without_cert", changed(spec__api={"tls": {"keyFile": "/k"}}),
         "spec.api.tls.certFile", "spec.api.tls.certFile: required with keyFile"),
    case("tls_relative_key", changed(spec__api={"tls": {"certFile": "/c", "keyFile": "k.pem"}}),
         "spec.api.tls.keyFile", "absolute path", "(got 'k.pem')"),
    case("internal_grpc_port", changed(spec__api={"httpPort": 9001}), "spec.api.httpPort",
         "plaintext gRPC proxy behind the TLS front", "(got 9001)"),
    case("upgrade_bad_strategy", changed(spec__upgrade={"strategy": "Recreate"}),
         "spec.upgrade.strategy", "'NewClusterWithIncrementalUpgrade'", "(got 'Recreate')"),
    case("upgrade_incremental_without_options",
         changed(spec__upgrade={"strategy": "NewClusterWithIncrementalUpgrade"}),
         "spec.upgrade.clusterUpgradeOptions",
         "spec.upgrade.clusterUpgradeOptions: required when strategy is "
         "NewClusterWithIncrementalUpgrade"),
    case("upgrade_options_without_incremental",
         changed(spec__upgrade={"clusterUpgradeOptions": incremental()["clusterUpgradeOptions"]}),
         "spec.upgrade.clusterUpgradeOptions",
         "only allowed with strategy NewClusterWithIncrementalUpgrade (strategy is NewCluster)",
         "(got {'gatewayClassName'"),
    case("upgrade_missing_gateway_class",
         changed(spec__upgrade=incremental(gatewayClassName=DELETE)),
         "spec.upgrade.clusterUpgradeOptions",
         "spec.upgrade.clusterUpgradeOptions.gatewayClassName: required field is missing"),
    case("upgrade_bad_gateway_class",
         changed(spec__upgrade=incremental(gatewayClassName="Istio Gateway")),
         "spec.upgrade.clusterUpgradeOptions.gatewayClassName", "(got 'Istio Gateway')"),
    case("upgrade_zero_step", changed(spec__upgrade=incremental(stepSizePercent=0)),
         "spec.upgrade.clusterUpgradeOptions.stepSizePercent", "(got 0)"),
    case("upgrade_surge_above_100", changed(spec__upgrade=incremental(maxSurgePercent=150)),
         "spec.upgrade.clusterUpgradeOptions.maxSurgePercent", "(got 150)"),
    case("upgrade_step_above_surge",
         changed(spec__upgrade=incremental(stepSizePercent=50, maxSurgePercent=20)),
         "spec.upgrade.clusterUpgradeOptions.stepSizePercent", "maxSurgePercent (20)", "(got 50)"),
    case("upgrade_zero_interval", changed(spec__upgrade=incremental(intervalSeconds=0)),
         "spec.upgrade.clusterUpgradeOptions.intervalSeconds", "(got 0)"),
    case("upgrade_incremental_with_tls",
         changed(spec__api={"tls": {"secretName": "t"}}, spec__upgrade=incremental()),
         "spec.upgrade.strategy", "api.tls", "(got 'NewClusterWithIncrementalUpgrade')"),
    # the API server names the field as written: typo_unknown_field covers its refusal
    case("snake_case_input_reported_in_camel_case", changed(spec__prefill__max_batch_tokens=0),
         "spec.prefill.maxBatchTokens", "(got 0)", layers=SPEC),
    case("missing_metadata", changed(metadata=DELETE), "metadata",
         "metadata: required field is missing"),
    case("pool_not_a_mapping", changed(spec__decode=[1, 2]), "spec.decode",
         "spec.decode: must be a mapping"),
    case("ratio_when_aggregated",
         changed(spec__disaggregation=False, spec__prefill=DELETE,
                 spec__ratio={"min": 1, "max": 2}),
         "spec.ratio"),
    case("volume_host_path_dot_dot", changed(spec__model__volume={"hostPath": "/nvme/../etc"}),
         "spec.model.volume.hostPath"),
    case("volume_mount_path_over_tls",
         changed(spec__model__volume={"claimName": "weights", "mountPath": "/etc/r1serve/tls"}),
         "spec.model.volume.mountPath"),
    case("volume_absolute_sub_path",
         changed(spec__model__volume={"claimName": "weights", "subPath": "/r1"}),
         "spec.model.volume.subPath"),
    case("volume_nfs_without_server", changed(spec__model__volume={"nfs": {"path": "/exports"}}),
         "spec.model.volume.nfs"),
    case("source_outside_default_mount",
         changed(spec__model__source="/data/r1", spec__model__volume={"claimName": "weights"}),
         "spec.model.source"),
]
