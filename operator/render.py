"""Pure rendering of an R1Deployment into its child objects: the KubeRay RayService and the client Service."""

from typing import Any

from r1serve.operator import constants as K
from r1serve.operator.config import OperatorConfig
from r1serve.spec import SpecError, expert_load, quantity
from r1serve.spec import constants as C
from r1serve.spec.errors import format_problem
from r1serve.spec.model import Pool, R1Deployment, Role
from r1serve.spec.sections import CUDA_IPC_LOCAL_ONLY, SHM_MOUNT_PATH
from r1serve.spec.serve_config import (
    nodes_per_replica,
    rank_cpus,
    ranks_per_node,
    serve_config_yaml,
    serve_grpc_port,
)
from r1serve.spec.workers import Workers


def labels_for(deployment: R1Deployment, component: str) -> dict[str, str]:
    """r1serve's labels of a child object or Ray pod.

    The resource's own metadata.labels are copied nowhere. On a pod template a `kubectl label`
    would change rayClusterConfig, and KubeRay answers that with a whole second Ray cluster; on
    the RayService and Service alone they would be harmless, but one rule for every object is
    easier to trust than two. Pod labels come from spec.workers.podLabels.
    """
    return {
        K.LABEL_NAME: K.APP_NAME,
        K.LABEL_INSTANCE: deployment.metadata.name,
        K.LABEL_COMPONENT: component,
        K.LABEL_MANAGED_BY: K.OPERATOR_NAME,
        K.LABEL_PART_OF: K.APP_NAME,
        K.LABEL_DEPLOYMENT: deployment.metadata.name,
    }


def pod_labels(deployment: R1Deployment, role: Role | None) -> dict[str, str]:
    """Labels of the head (role None) or a pool's worker pods: spec.workers.podLabels, a pool's
    own merged over them, then r1serve's. The spec refuses r1serve's keys in podLabels; ours still
    come last, so the Service's selector never depends on that check."""
    if role is None:
        return {**(deployment.spec.workers.pod_labels or {}), **labels_for(deployment, "head")}
    return {**(deployment.spec.workers_for(role).pod_labels or {}),
            **labels_for(deployment, f"{role}-worker"), K.LABEL_POOL: role}


def owner_reference(deployment: R1Deployment, uid: str) -> dict[str, Any]:
    """Controller reference to the R1Deployment: the garbage collector deletes children with it."""
    return {"apiVersion": K.R1D_API_VERSION, "kind": K.R1D_KIND, "name": deployment.metadata.name,
            "uid": uid, "controller": True, "blockOwnerDeletion": True}


def rayservice_name(deployment: R1Deployment) -> str:
    """The RayService is named like the R1Deployment (KubeRay derives `<name>-head-svc` etc.)."""
    return deployment.metadata.name


def _metadata(deployment: R1Deployment, component: str, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": deployment.metadata.name,
        "namespace": deployment.metadata.namespace,
        "labels": labels_for(deployment, component),
    }
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(deployment, owner_uid)]
    return meta


def image_for(deployment: R1Deployment, role: Role | None, config: OperatorConfig) -> str:
    """The pod image: the spec's (pool over shared), else the operator's default, else Ray's."""
    workers = deployment.spec.workers_for(role) if role else deployment.spec.workers
    if workers.image:
        return workers.image
    if config.default_image:
        return config.default_image
    pool = deployment.spec.active_pools().get(role) if role else None
    return K.DEFAULT_GPU_IMAGE if pool is not None and pool.gpus_per_rank else K.DEFAULT_CPU_IMAGE


def _credentials(deployment: R1Deployment) -> tuple[list, list, list]:
    """env, volumeMounts and volumes that hand the API token and TLS secret to every Ray pod
    (Ingress replicas and proxies may run on any node)."""
    api = deployment.spec.api
    env, mounts, volumes = [], [], []
    if api.auth is not None and api.auth.secret_name:
        env.append({"name": C.API_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
            "name": api.auth.secret_name, "key": C.API_TOKEN_SECRET_KEY}}})
    if api.tls is not None and api.tls.secret_name:
        mounts.append({"name": K.TLS_VOLUME, "mountPath": C.TLS_MOUNT_PATH, "readOnly": True})
        volumes.append({"name": K.TLS_VOLUME, "secret": {"secretName": api.tls.secret_name}})
    return env, mounts, volumes


def _model_volume(deployment: R1Deployment) -> tuple[list, list]:
    """volumeMounts and volumes that put the checkpoint (spec.model.volume) into a Ray pod: the
    Ingress on the head reads the tokenizer and config.json, the workers the weights."""
    volume = deployment.spec.model.volume
    if volume is None:
        return [], []
    mount = {"name": K.MODEL_VOLUME, "mountPath": volume.mount_path, "readOnly": True}
    if volume.sub_path:
        mount["subPath"] = volume.sub_path
    if volume.claim_name:
        source = {"persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": True}}
    elif volume.nfs is not None:
        source = {"nfs": {"server": volume.nfs.server, "path": volume.nfs.path, "readOnly": True}}
    else:
        # Directory, not the default "": a node without the copy fails the pod at start-up
        # instead of serving from an empty directory the kubelet created.
        source = {"hostPath": {"path": volume.host_path, "type": "Directory"}}
    return [mount], [{"name": K.MODEL_VOLUME, **source}]


def pod_security_level(deployment: R1Deployment) -> str:
    """The strictest Pod Security Standard the Ray pods meet, for the namespace's
    pod-security.kubernetes.io/enforce label: "restricted", "baseline" or "privileged".

    Only the model volume decides: everything else the pods run with meets "restricted".
    "restricted" allows PVCs but no nfs volume; "baseline" allows nfs but no hostPath.
    """
    volume = deployment.spec.model.volume
    if volume is None or volume.claim_name:
        return "restricted"
    return "baseline" if volume.nfs is not None else "privileged"


# Ray's images run as user `ray` (uid 1000, group `users` 100). The root filesystem stays writable:
# Ray writes its session directory, logs and sockets under /tmp/ray and runtime environments and
# caches under the home directory while it runs, so a read-only root would need every such path
# remounted; non-root, no privilege escalation and no capabilities hold regardless.
# The seccomp profile is the pod's, so it also covers the containers KubeRay adds (the autoscaler
# sidecar, the wait-gcs-ready init container): Pod Security "restricted" asks for one.
RAY_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                    "seccompProfile": {"type": "RuntimeDefault"}}
RAY_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                          "readOnlyRootFilesystem": False}
# KubeRay builds the head's autoscaler sidecar itself and takes only this context from us; it
# runs Ray's image too, and writes its logs to the /tmp/ray volume it shares with the head, so
# like Ray's container its root stays writable. The seccomp profile repeats the pod's so the
# context passes "restricted" on its own.
AUTOSCALER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                       "capabilities": {"drop": ["ALL"]},
                       "seccompProfile": {"type": "RuntimeDefault"}}


def grpc_tls_sidecar(deployment: R1Deployment, image: str, mounts: list) -> dict[str, Any]:
    """The gRPC TLS front on api.grpcPort, forwarding to Serve's plaintext gRPC proxy in the pod.

    Every Ray pod gets one: Serve runs a proxy on every node and the client Service selects any
    pod whose proxy is healthy. Same image as the Ray container (r1serve is installed there).
    """
    api = deployment.spec.api
    return {
        "name": K.GRPC_TLS_CONTAINER,
        "image": image,
        "command": ["r1serve", "grpc-tls", "--listen", f"[::]:{api.grpc_port}",
                    "--backend", f"127.0.0.1:{C.GRPC_BACKEND_PORT}",
                    "--cert", api.tls.cert_path, "--key", api.tls.key_path],
        "ports": [{"name": K.GRPC_TLS_PORT_NAME, "containerPort": api.grpc_port}],
        "readinessProbe": {"tcpSocket": {"port": api.grpc_port}, "periodSeconds": 5},
        "resources": {"requests": dict(K.GRPC_TLS_RESOURCES), "limits": dict(K.GRPC_TLS_RESOURCES)},
        # The front writes nothing (no logs to disk, no caches), so unlike Ray its root can be read-only.
        "securityContext": {**RAY_CONTAINER_SECURITY, "readOnlyRootFilesystem": True},
        "volumeMounts": list(mounts),
    }


def expert_load_configmap(deployment: R1Deployment, owner_uid: str, data: dict[str, str]) -> dict[str, Any]:
    """The expert load the pools' replicas saw (r1serve.spec.expert_load), kept for the replicas that start
    later; owned by the R1Deployment, so it goes with it."""
    meta = _metadata(deployment, "expert-load", owner_uid)
    meta["name"] = expert_load.configmap_name(deployment.metadata.name)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(data)}


def _expert_load_volume(deployment: R1Deployment) -> tuple[dict, dict]:
    """The kept expert load in every Ray pod. Optional, and there from the first render: the ConfigMap appears
    once replicas report load, and its appearance changes no pod template (nothing restarts)."""
    mount = {"name": expert_load.VOLUME, "mountPath": expert_load.MOUNT_PATH, "readOnly": True}
    volume = {"name": expert_load.VOLUME, "configMap": {
        "name": expert_load.configmap_name(deployment.metadata.name), "optional": True}}
    return mount, volume


def _pod_template(deployment: R1Deployment, *, container: dict[str, Any], shm_size: str,
                  labels: dict[str, str], workers: Workers | None = None) -> dict[str, Any]:
    env, mounts, volumes = _credentials(deployment)
    model_mounts, model_volumes = _model_volume(deployment)
    load_mount, load_volume = _expert_load_volume(deployment)
    container = {**container, "securityContext": dict(RAY_CONTAINER_SECURITY), "volumeMounts": [
        {"name": K.SHM_VOLUME, "mountPath": SHM_MOUNT_PATH}, *mounts, *model_mounts, load_mount]}
    if env:
        container["env"] = env
    # KubeRay takes the first container as the Ray container: sidecars go after it.
    containers = [container]
    if deployment.spec.api.tls is not None:
        containers.append(grpc_tls_sidecar(deployment, container["image"], mounts))
    spec: dict[str, Any] = {
        "securityContext": dict(RAY_POD_SECURITY),
        "containers": containers,
        # Ray's object store and NCCL live in /dev/shm; the container default of 64Mi is far
        # too small, so it is a memory-backed emptyDir of the requested size.
        "volumes": [{"name": K.SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
                    *volumes, *model_volumes, load_volume],
    }
    if workers is not None and workers.node_selector:
        spec["nodeSelector"] = dict(workers.node_selector)
    if workers is not None and workers.tolerations:
        spec["tolerations"] = [dict(t) for t in workers.tolerations]
    return {"metadata": {"labels": labels}, "spec": spec}


def _worker_resources(pool: Pool, workers: Workers, config: OperatorConfig) -> dict[str, Any]:
    ranks = ranks_per_node(pool)
    memory = workers.resources.memory if workers.resources and workers.resources.memory else None
    # One extra core for bundle 0, the replica actor, so a STRICT_PACKed group fits one pod.
    amounts = {
        "cpu": quantity.cpu(ranks * rank_cpus(workers) + C.REPLICA_ACTOR_CPUS),
        "memory": quantity.scale(memory or config.rank_memory, ranks),
    }
    if pool.gpus_per_rank:
        amounts[K.GPU_RESOURCE] = str(ranks * pool.gpus_per_rank)
    # Requests equal limits: KubeRay derives Ray's CPU and GPU counts from the limits, and
    # guaranteed QoS keeps the kubelet from evicting a rank mid-step.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _worker_group(deployment: R1Deployment, role: Role, config: OperatorConfig) -> dict[str, Any]:
    pool = deployment.spec.active_pools()[role]
    workers = deployment.spec.workers_for(role)
    pods = nodes_per_replica(pool)
    container = {
        "name": K.WORKER_CONTAINER,
        "image": image_for(deployment, role, config),
        "resources": _worker_resources(pool, workers, config),
    }
    return {
        "groupName": role,
        # One replica of the pool (an expert-parallel group) spans `pods` worker pods; the Ray
        # autoscaler moves `replicas` between the bounds as Serve asks for more or fewer.
        "replicas": pods * pool.replicas.effective_initial,
        "minReplicas": pods * pool.replicas.min,
        "maxReplicas": pods * pool.replicas.max,
        "numOfHosts": 1,
        "rayStartParams": {},
        "resources": {C.POOL_RAY_RESOURCES[role]: str(ranks_per_node(pool))},
        "template": _pod_template(deployment, container=container,
                                  labels=pod_labels(deployment, role),
                                  shm_size=workers.shm_size or config.shm_size, workers=workers),
    }


def _head_ports(deployment: R1Deployment) -> list[dict[str, Any]]:
    api = deployment.spec.api
    # Behind TLS, Serve's gRPC port is the plaintext backend of the sidecar (which declares
    # api.grpcPort itself); a serve-* name would let KubeRay's serve Service expose it.
    grpc = ({"name": K.GRPC_BACKEND_PORT_NAME, "containerPort": serve_grpc_port(deployment)}
            if api.tls is not None else
            {"name": K.SERVE_GRPC_PORT_NAME, "containerPort": api.grpc_port})
    return [
        {"name": K.GCS_PORT_NAME, "containerPort": K.GCS_PORT},
        {"name": K.DASHBOARD_PORT_NAME, "containerPort": K.DASHBOARD_PORT},
        {"name": K.CLIENT_PORT_NAME, "containerPort": K.CLIENT_PORT},
        {"name": K.SERVE_HTTP_PORT_NAME, "containerPort": api.http_port},
        grpc,
    ]


def _head_group(deployment: R1Deployment, config: OperatorConfig) -> dict[str, Any]:
    amounts = {"cpu": config.head_cpu, "memory": config.head_memory}
    container = {
        "name": K.HEAD_CONTAINER,
        "image": image_for(deployment, None, config),
        "ports": _head_ports(deployment),
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
    }
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0"},
        "serviceType": "ClusterIP",
        "template": _pod_template(deployment, container=container, labels=pod_labels(
            deployment, None), shm_size=deployment.spec.workers.shm_size or config.shm_size),
    }


def upgrade_strategy(deployment: R1Deployment) -> dict[str, Any]:
    """spec.upgrade as KubeRay's upgradeStrategy; the incremental one also needs the in-tree
    autoscaler, which every r1serve cluster runs."""
    upgrade = deployment.spec.upgrade
    strategy: dict[str, Any] = {"type": upgrade.strategy}
    options = upgrade.cluster_upgrade_options
    if options is not None:
        strategy["clusterUpgradeOptions"] = {
            "gatewayClassName": options.gateway_class_name,
            "maxSurgePercent": options.max_surge_percent,
            "stepSizePercent": options.step_size_percent,
            "intervalSeconds": options.interval_seconds,
        }
    return strategy


def check_for_kubernetes(deployment: R1Deployment) -> None:
    """Raise SpecError for what a valid spec asks that only `r1serve serve` on one machine can do (the CRD's rules
    refuse it too; this covers a CRD installed before them)."""
    connector = deployment.spec.kv_transfer.connector
    if connector == "cuda-ipc":
        raise SpecError([format_problem("spec.kvTransfer.connector", CUDA_IPC_LOCAL_ONLY, connector)],
                        f"{deployment.metadata.namespace}/{deployment.metadata.name}")


def render_rayservice(deployment: R1Deployment, *, config: OperatorConfig | None = None,
                      owner_uid: str | None = None, generation: int | None = None) -> dict[str, Any]:
    """The KubeRay RayService that runs `deployment` (no API calls; same input, same bytes)."""
    check_for_kubernetes(deployment)
    config = config or OperatorConfig()
    metadata = _metadata(deployment, "rayservice", owner_uid)
    if generation is not None:
        metadata["annotations"] = {K.ANNOTATION_SOURCE_GENERATION: str(generation)}
    return {
        "apiVersion": K.RAY_API_VERSION,
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            # The same function the local runner deploys; any byte change redeploys the app.
            "serveConfigV2": serve_config_yaml(deployment),
            # Read by KubeRay only when the cluster must change (r1serve.operator.rollout).
            "upgradeStrategy": upgrade_strategy(deployment),
            "rayClusterConfig": {
                "rayVersion": K.RAY_VERSION_STRING,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "upscalingMode": "Default",
                                      "securityContext": dict(AUTOSCALER_SECURITY)},
                # Omitted means no token auth on KubeRay; Ray 2.60 expects it on.
                "authOptions": {"mode": "token"},
                "headGroupSpec": _head_group(deployment, config),
                "workerGroupSpecs": [_worker_group(deployment, role, config)
                                     for role in deployment.spec.active_pools()],
            },
        },
    }


def service_name(deployment: R1Deployment) -> str:
    """The client Service is named like the R1Deployment: `<name>.<namespace>.svc`."""
    return deployment.metadata.name


def render_services(deployment: R1Deployment, *, owner_uid: str | None = None) -> list[dict[str, Any]]:
    """The client Service: gRPC and HTTP, never Ray's GCS, dashboard or client ports."""
    api = deployment.spec.api
    # With api.tls, api.grpcPort is the TLS sidecar's; Serve's plaintext port is never a target.
    ports = [
        {"name": K.SERVICE_GRPC_PORT_NAME, "port": api.grpc_port, "targetPort": api.grpc_port,
         "protocol": "TCP", "appProtocol": "grpc"},
        {"name": K.SERVICE_HTTP_PORT_NAME, "port": api.http_port, "targetPort": api.http_port,
         "protocol": "TCP", "appProtocol": "https" if api.tls else "http"},
    ]
    return [{
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(deployment, "api", owner_uid),
        "spec": {
            "type": "ClusterIP",
            "selector": {K.LABEL_DEPLOYMENT: deployment.metadata.name,
                         K.KUBERAY_SERVE_LABEL: "true"},
            "ports": ports,
        },
    }]


def endpoints(deployment: R1Deployment) -> dict[str, str]:
    """Cluster-internal addresses of the client Service."""
    api, meta = deployment.spec.api, deployment.metadata
    host = f"{service_name(deployment)}.{meta.namespace}.svc"
    scheme = "https" if api.tls else "http"
    return {"grpc": f"{host}:{api.grpc_port}", "http": f"{scheme}://{host}:{api.http_port}"}


def render_children(deployment: R1Deployment, *, config: OperatorConfig | None = None,
                    owner_uid: str | None = None, generation: int | None = None) -> list[dict]:
    """Every object the operator applies for `deployment`, the RayService first."""
    rayservice = render_rayservice(deployment, config=config, owner_uid=owner_uid,
                                   generation=generation)
    return [rayservice, *render_services(deployment, owner_uid=owner_uid)]
