"""Names, labels, annotations, ports and API coordinates used by the operator's rendering and handlers."""

from r1serve import __version__
from r1serve.spec import constants as spec_constants
from r1serve.spec.model import API_VERSION, GROUP, KIND, PLURAL, VERSION

OPERATOR_NAME = "r1serve-operator"
# Server-side apply field manager: the operator owns exactly the fields it renders.
FIELD_MANAGER = OPERATOR_NAME

R1D_GROUP, R1D_VERSION, R1D_PLURAL, R1D_KIND, R1D_API_VERSION = (
    GROUP, VERSION, PLURAL, KIND, API_VERSION)
RAY_GROUP, RAY_VERSION = "ray.io", "v1"
RAY_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION}"
RAYSERVICES, RAYCLUSTERS = "rayservices", "rayclusters"
RAYSERVICE_CRD = f"{RAYSERVICES}.{RAY_GROUP}"
KUBERAY_VERSION = "1.7.0"

# Labels on every child object (and on the Ray pods, through the pod templates).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_POOL = f"{GROUP}/pool"
APP_NAME = "r1serve"

# Labels KubeRay puts on the pods it creates.
KUBERAY_CLUSTER_LABEL = "ray.io/cluster"
KUBERAY_GROUP_LABEL = "ray.io/group"
KUBERAY_NODE_TYPE_LABEL = "ray.io/node-type"
# Set to "true" by KubeRay on pods whose Serve proxy is healthy: the client Service selects it
# so traffic only reaches pods that can serve, also across a zero-downtime cluster upgrade.
KUBERAY_SERVE_LABEL = "ray.io/serve"

# The R1Deployment generation a RayService was rendered from: status.observedGeneration comes
# from it, not from the live R1Deployment, which may already be newer than what was applied.
ANNOTATION_SOURCE_GENERATION = f"{GROUP}/source-generation"
# kopf's own bookkeeping (handler progress, last handled spec) lives under this prefix.
KOPF_ANNOTATION_PREFIX = GROUP

# Ports of the Ray head container. KubeRay adds no default ports once any is declared, so all
# are declared; only the two Serve ports are exposed by the client Service.
GCS_PORT, GCS_PORT_NAME = 6379, "gcs-server"
DASHBOARD_PORT, DASHBOARD_PORT_NAME = 8265, "dashboard"
CLIENT_PORT, CLIENT_PORT_NAME = 10001, "client"
SERVE_HTTP_PORT_NAME = "serve"        # KubeRay's serve Service exposes `serve` and `serve-*`
SERVE_GRPC_PORT_NAME = "serve-grpc"
# With api.tls Serve's gRPC proxy listens plaintext on spec GRPC_BACKEND_PORT: declared under a
# name outside serve-*, so KubeRay's serve Service never exposes the plaintext port.
GRPC_BACKEND_PORT_NAME = "grpc-backend"
GRPC_TLS_PORT_NAME = "grpc-tls"
SERVICE_GRPC_PORT_NAME = "grpc"
SERVICE_HTTP_PORT_NAME = "http"

HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
SHM_VOLUME = "dshm"
TLS_VOLUME = "tls"
# The checkpoint (spec.model.volume), read-only in every Ray pod.
MODEL_VOLUME = "model"
# The gRPC TLS front (`r1serve grpc-tls`), a sidecar of every Ray pod with api.tls. Requests equal
# limits like the Ray container's, so the pod keeps guaranteed QoS; it only copies bytes.
GRPC_TLS_CONTAINER = "grpc-tls"
GRPC_TLS_RESOURCES = {"cpu": "500m", "memory": "256Mi"}
GPU_RESOURCE = "nvidia.com/gpu"

RAY_VERSION_STRING = spec_constants.RAY_VERSION
# Ray's own images, the bases the Dockerfile installs r1serve on.
RAY_CPU_IMAGE = f"rayproject/ray:{RAY_VERSION_STRING}-py311-cpu"
RAY_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION_STRING}-py311-gpu"
# The image the Dockerfile builds: the operator's, and the Ray pods' unless a resource or the
# operator's settings name another (the pods run r1serve, so Ray's own image cannot serve).
# Never `latest`: a moving tag would change the cluster under a running deployment.
IMAGE_REPOSITORY = "ghcr.io/r1serve/r1serve"
DEFAULT_CPU_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
DEFAULT_GPU_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-gpu"

LIVENESS_PORT = 8080
LIVENESS_PATH = "/healthz"
