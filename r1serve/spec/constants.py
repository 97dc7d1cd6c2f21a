"""Names shared by the Serve config, the operator and the Serve runtime: import paths, deployment names, resources."""

# The Serve application. Clients send gRPC metadata ("application", SERVE_APP_NAME); with one
# application Serve routes every request to it whatever the name, but status is keyed by it.
SERVE_APP_NAME = "r1serve"
SERVE_ROUTE_PREFIX = "/"
# `serve run` / serveConfigV2 import path; called with `args` ({"deployment": <manifest>}).
APP_BUILDER = "r1serve.runtime.serve.app:build_app"
APP_ARG_DEPLOYMENT = "deployment"

# Serve deployment names inside the application.
INGRESS_DEPLOYMENT = "Ingress"
PREFILL_DEPLOYMENT = "PrefillServer"
DECODE_DEPLOYMENT = "DecodeServer"
POOL_DEPLOYMENTS = {"prefill": PREFILL_DEPLOYMENT, "decode": DECODE_DEPLOYMENT}

# Custom autoscaling policies (Ray Serve `policy_function` import paths) and their kwargs.
PREFILL_POLICY = "r1serve.runtime.serve.autoscaling:prefill_policy"
DECODE_POLICY = "r1serve.runtime.serve.autoscaling:decode_policy"
POOL_POLICIES = {"prefill": PREFILL_POLICY, "decode": DECODE_POLICY}
# Application-level policy (only with spec.ratio): both pools' decisions, then the ratio band. Serve
# lets it take precedence over the per-deployment policies, which stay for a config without it.
RATIO_POLICY = "r1serve.runtime.serve.autoscaling:ratio_policy"
POLICY_KW_TARGET_QUEUED_TOKENS = "target_queued_tokens"
POLICY_KW_TARGET_ONGOING_REQUESTS = "target_ongoing_requests"
POLICY_KW_TARGET_KV_CACHE_USAGE = "target_kv_cache_usage"

# A pool replica being removed (scale-down, redeploy) gets no new requests; Serve waits for its ongoing
# ones, streams included, checking every WAIT_LOOP seconds, for up to TIMEOUT seconds before stopping
# it. An R1 answer of 32768 tokens at ~40 tokens/s takes about 14 minutes: the timeout covers it.
POOL_GRACEFUL_SHUTDOWN_TIMEOUT_S = 900.0
POOL_GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 2.0

# HTTP route of the Ingress serving the pools' scaling status (`r1serve status`, the operator).
SCALING_STATUS_ROUTE = "/r1serve/v1/status"

# gRPC servicers registered on every Serve gRPC proxy. The generated modules must be importable
# in the proxy process (installed in the image), not only in the application's working_dir.
# r1serve's own registration (not the generated one): it turns undecodable requests into
# INVALID_ARGUMENT instead of the proxy's UNKNOWN (see runtime/serve/grpc_servicer.py).
GRPC_INFERENCE_SERVICER = (
    "r1serve.runtime.serve.grpc_servicer.add_InferenceServicer_to_server"
)
# The standard grpc.health.v1.Health service (grpcio-health-checking), so Kubernetes gRPC probes
# and grpc_health_probe work unchanged; the Ingress deployment implements its `Check` method.
GRPC_HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
GRPC_SERVICER_FUNCTIONS = (GRPC_INFERENCE_SERVICER, GRPC_HEALTH_SERVICER)

# HTTP proxies listen on every interface: in a pod the Service reaches them over the pod IP.
HTTP_HOST = "0.0.0.0"

# Ray logical resources. Each expert-parallel rank bundle also asks for one unit of its pool's
# custom resource, which only that pool's worker pods advertise, so a prefill rank never lands
# on a decode node (the pools may run on different GPU types). A local Ray must declare them
# too: see r1serve.spec.serve_config.local_ray_resources.
POOL_RAY_RESOURCES = {"prefill": "r1serve_prefill_rank", "decode": "r1serve_decode_rank"}
# Bundle 0 of every pool replica holds the replica actor itself, which only orchestrates.
REPLICA_ACTOR_CPUS = 1.0
# Ray CPUs per rank when spec.workers.resources.cpu is unset.
DEFAULT_RANK_CPUS = 1.0
INGRESS_CPUS = 1.0

# The Ingress streams every response for its whole duration, so it holds many long requests
# per replica; it scales on that count between 1 and INGRESS_MAX_REPLICAS replicas.
INGRESS_MAX_ONGOING_REQUESTS = 4096
INGRESS_TARGET_ONGOING_REQUESTS = 2048
INGRESS_MAX_REPLICAS = 4

# Node shape when sizing an expert-parallel group: GPU nodes carry gpusPerNode GPUs (default 8,
# H100/H200 HGX), and CPU ranks are grouped at most 8 to a node. The operator sizes worker pods
# and the Serve config picks the placement strategy from the same number.
GPUS_PER_NODE = 8
MAX_CPU_RANKS_PER_NODE = 8

# Where the operator puts client credentials into the Ray pods.
API_TOKEN_ENV = "R1SERVE_API_TOKEN"
API_TOKEN_SECRET_KEY = "token"
TLS_MOUNT_PATH = "/etc/r1serve/tls"
TLS_CERT_FILE, TLS_KEY_FILE = "tls.crt", "tls.key"  # keys of a kubernetes.io/tls Secret

# Pod labels spec.workers.podLabels may not set: the ones the operator puts on every Ray pod (its
# client Service and status select pods by them) and the prefixes of r1serve and of KubeRay, whose
# controller labels the pods it creates under ray.io/.
RESERVED_POD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                       "app.kubernetes.io/component", "app.kubernetes.io/managed-by",
                       "app.kubernetes.io/part-of")
RESERVED_POD_LABEL_PREFIXES = ("r1serve.io/", "ray.io/")

# With spec.api.tls, Serve's own gRPC proxy (which Ray 2.60 can only run plaintext) moves to this
# port and r1serve's TLS front (runtime/serve/grpc_tls.py) takes api.grpcPort, forwarding to it
# over loopback. The spec refuses it as an api port. Outside Ray's worker port range (10002+).
GRPC_BACKEND_PORT = 9001

RAY_VERSION = "2.60.0"
