"""The Ray Serve config of an R1Deployment: one pure function shared by the local runner and the operator."""

from typing import Any

import yaml

from r1serve.spec import constants as C
from r1serve.spec import quantity
from r1serve.spec.model import Pool, R1Deployment, Role
from r1serve.spec.workers import Workers


def rank_cpus(workers: Workers) -> float:
    """Ray CPUs reserved per expert-parallel rank (spec.workers.resources.cpu or 1)."""
    cpu = workers.resources.cpu if workers.resources is not None else None
    return quantity.to_float(cpu) if cpu is not None else C.DEFAULT_RANK_CPUS


def ranks_per_node(pool: Pool) -> int:
    """How many ranks of one replica share a node (and so a worker pod).

    The largest divisor of expertParallel whose GPUs fit one node, so every node of a
    replica holds the same number of ranks and no node is left half used.
    """
    per_node = (pool.gpus_per_node // pool.gpus_per_rank if pool.gpus_per_rank
                else C.MAX_CPU_RANKS_PER_NODE)
    per_node = max(1, min(per_node, pool.expert_parallel))
    while pool.expert_parallel % per_node:
        per_node -= 1
    return per_node


def nodes_per_replica(pool: Pool) -> int:
    """Worker pods (nodes) one replica (expert-parallel group) spans."""
    return pool.expert_parallel // ranks_per_node(pool)


def _bundles(role: Role, pool: Pool, workers: Workers) -> list[dict[str, float]]:
    rank: dict[str, float] = {"CPU": rank_cpus(workers), C.POOL_RAY_RESOURCES[role]: 1.0}
    if pool.gpus_per_rank:
        rank["GPU"] = float(pool.gpus_per_rank)
    return [{"CPU": C.REPLICA_ACTOR_CPUS}] + [dict(rank) for _ in range(pool.expert_parallel)]


def _placement_strategy(pool: Pool) -> str:
    # A group that fits one node is STRICT_PACKed: its all-to-all then stays on NVLink (or
    # shared memory on CPU). Larger groups cannot be strictly packed at all; PACK still puts
    # them on as few nodes as possible instead of spreading ranks over half-empty nodes.
    return "STRICT_PACK" if nodes_per_replica(pool) == 1 else "PACK"


def _policy_kwargs(role: Role, pool: Pool) -> dict[str, Any]:
    scaling = pool.autoscaling
    if role == "prefill":
        return {C.POLICY_KW_TARGET_QUEUED_TOKENS: scaling.target_queued_tokens}
    return {
        C.POLICY_KW_TARGET_ONGOING_REQUESTS: scaling.target_ongoing_requests,
        C.POLICY_KW_TARGET_KV_CACHE_USAGE: scaling.target_kv_cache_usage,
    }


def _pool_deployment(role: Role, pool: Pool, workers: Workers) -> dict[str, Any]:
    replicas, scaling = pool.replicas, pool.autoscaling
    return {
        "name": C.POOL_DEPLOYMENTS[role],
        # A replica takes its waiting requests too, so its engine sees the queue it reports as
        # the autoscaling signal; Serve's own queue in front of it is the overflow bound that
        # answers RESOURCE_EXHAUSTED / 429 when every replica is full.
        "max_ongoing_requests": pool.max_running_requests + pool.max_queued_requests,
        "max_queued_requests": pool.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": replicas.min,
            "max_replicas": replicas.max,
            "initial_replicas": replicas.effective_initial,
            "upscale_delay_s": scaling.upscale_delay_seconds,
            "downscale_delay_s": scaling.downscale_delay_seconds,
            "policy": {
                "policy_function": C.POOL_POLICIES[role],
                "policy_kwargs": _policy_kwargs(role, pool),
            },
        },
        "graceful_shutdown_timeout_s": C.POOL_GRACEFUL_SHUTDOWN_TIMEOUT_S,
        "graceful_shutdown_wait_loop_s": C.POOL_GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
        "ray_actor_options": {"num_cpus": C.REPLICA_ACTOR_CPUS},
        "placement_group_bundles": _bundles(role, pool, workers),
        "placement_group_strategy": _placement_strategy(pool),
    }


def _ratio_policy(deployment: R1Deployment) -> dict[str, Any] | None:
    """The application-level policy that keeps prefill:decode replicas in spec.ratio (None without it)."""
    spec = deployment.spec
    if spec.ratio is None or spec.prefill is None or not spec.disaggregation:
        return None
    kwargs = {**_policy_kwargs("prefill", spec.prefill), **_policy_kwargs("decode", spec.decode),
              "prefill_deployment": C.PREFILL_DEPLOYMENT, "decode_deployment": C.DECODE_DEPLOYMENT,
              "ratio_min": spec.ratio.min, "ratio_max": spec.ratio.max}
    return {"policy_function": C.RATIO_POLICY, "policy_kwargs": kwargs}


def _ingress_deployment() -> dict[str, Any]:
    return {
        "name": C.INGRESS_DEPLOYMENT,
        "max_ongoing_requests": C.INGRESS_MAX_ONGOING_REQUESTS,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": C.INGRESS_MAX_REPLICAS,
            "target_ongoing_requests": C.INGRESS_TARGET_ONGOING_REQUESTS,
        },
        "ray_actor_options": {"num_cpus": C.INGRESS_CPUS},
    }


def _http_options(deployment: R1Deployment) -> dict[str, Any]:
    tls = deployment.spec.api.tls
    options: dict[str, Any] = {"host": C.HTTP_HOST, "port": deployment.spec.api.http_port}
    if tls is not None:
        # Serve's HTTP proxy (uvicorn) terminates TLS itself: the given files, or the Secret
        # the operator mounts at TLS_MOUNT_PATH.
        options["ssl_certfile"] = tls.cert_path
        options["ssl_keyfile"] = tls.key_path
    return options


def serve_grpc_port(deployment: R1Deployment) -> int:
    """Where Serve's own gRPC proxy listens: api.grpcPort, or behind TLS the internal port.

    Ray 2.60's gRPC proxy has no TLS settings, so with api.tls it listens plaintext on
    GRPC_BACKEND_PORT and r1serve's TLS front (runtime/serve/grpc_tls.py) owns api.grpcPort.
    """
    api = deployment.spec.api
    return C.GRPC_BACKEND_PORT if api.tls is not None else api.grpc_port


def app_manifest(deployment: R1Deployment) -> dict[str, Any]:
    """The manifest handed to the app builder: spec plus name and namespace only.

    Labels and annotations do not change serving, and KubeRay redeploys the application on
    any byte change of its config, so they stay out (`kubectl label` must not restart it).
    The upgrade section only tells KubeRay how to replace the cluster: it stays out too.
    """
    manifest = deployment.to_manifest()
    manifest["spec"].pop("upgrade", None)
    manifest["metadata"] = {
        "name": deployment.metadata.name, "namespace": deployment.metadata.namespace}
    return manifest


def build_serve_config(deployment: R1Deployment) -> dict[str, Any]:
    """The Ray Serve config file (ServeDeploySchema) that runs `deployment`."""
    spec = deployment.spec
    deployments = [_ingress_deployment()] + [
        _pool_deployment(role, pool, spec.workers_for(role))
        for role, pool in spec.active_pools().items()
    ]
    application: dict[str, Any] = {
        "name": C.SERVE_APP_NAME,
        "route_prefix": C.SERVE_ROUTE_PREFIX,
        "import_path": C.APP_BUILDER,
        "args": {C.APP_ARG_DEPLOYMENT: app_manifest(deployment)},
        "deployments": deployments,
    }
    ratio = _ratio_policy(deployment)
    if ratio is not None:
        application["autoscaling_policy"] = ratio
    return {
        "grpc_options": {
            "port": serve_grpc_port(deployment),
            "grpc_servicer_functions": list(C.GRPC_SERVICER_FUNCTIONS),
        },
        "http_options": _http_options(deployment),
        "applications": [application],
    }


def dump_serve_config(config: dict[str, Any]) -> str:
    """YAML text with sorted keys: the same config always gives the same bytes."""
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False, allow_unicode=True,
                          width=1 << 16)


def serve_config_yaml(deployment: R1Deployment) -> str:
    """build_serve_config rendered as the deterministic YAML string of serveConfigV2."""
    return dump_serve_config(build_serve_config(deployment))


def local_ray_resources(deployment: R1Deployment) -> dict[str, float]:
    """Custom Ray resources a single-node local Ray must declare to place every replica."""
    return {
        C.POOL_RAY_RESOURCES[role]: float(pool.expert_parallel * pool.replicas.max)
        for role, pool in deployment.spec.active_pools().items()
    }

