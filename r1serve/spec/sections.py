"""Model, experts, KV-transfer, API and ratio sections of the R1Deployment spec."""

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from r1serve.spec import constants as C
from r1serve.spec.base import (
    NonBlank,
    ObjectName,
    SpecModel,
    check_env_name,
    check_no_whitespace,
)
from r1serve.spec.errors import FieldError

TINY_PREFIX = "tiny:"
DEFAULT_TINY_PRESET = "default"
PRESET_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")

# Ports a Ray head already listens on; serving there would fail at start-up or, worse, hijack
# the dashboard or the client server.
RESERVED_RAY_PORTS: dict[int, str] = {
    6379: "the Ray GCS server",
    8265: "the Ray dashboard",
    10001: "the Ray client server",
}
# Every port an api port must avoid: Ray's, and the one Serve's gRPC proxy moves to behind TLS.
RESERVED_PORTS: dict[int, str] = {
    **RESERVED_RAY_PORTS,
    C.GRPC_BACKEND_PORT: "Serve's plaintext gRPC proxy behind the TLS front",
}

Dtype = Literal["auto", "bfloat16", "float32", "float64"]
WeightFormat = Literal["auto", "fp8", "dequantized"]
FP8_NEEDS_GPUS = ("fp8 runs the weights through FP8 tensor cores: every pool needs GPUs (gpusPerRank > 0); "
                  "use dequantized or auto")
Connector = Literal["auto", "object-store", "nixl", "gloo", "cuda-ipc", "nccl"]
RankFailurePolicy = Literal["degrade", "restart"]
NCCL_REFUSED = ("nccl cannot serve elastic pools: Ray moves tensors over NCCL only between actors in "
                "a fixed collective group, which cannot follow prefill and decode replicas as they "
                "scale; use nixl (rank to rank, GPUs or CPUs) or auto")
GLOO_NEEDS_CPU_POOLS = ("gloo moves host memory between pools on CPUs (gpusPerRank: 0); pools with GPUs "
                        "use nixl, object-store or auto")
CUDA_IPC_NEEDS_GPU_POOLS = ("cuda-ipc shares GPU memory between the processes of one machine: every pool needs "
                            "GPUs (gpusPerRank > 0); pools on CPUs use gloo or auto")
CUDA_IPC_LOCAL_ONLY = ("cuda-ipc works only where both pools run on one machine (r1serve serve): on Kubernetes "
                       "prefill and decode pods do not share GPU memory; use nixl, object-store or auto")


def _absolute(path: str) -> str:
    # Serve's HTTP proxy and the gRPC front read the file from their own working directories.
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    return path


AbsolutePath = Annotated[NonBlank, AfterValidator(_absolute)]

# Mount paths are compared as text (model.source must lie under model.volume.mountPath, in
# pydantic and in CEL alike), so they are kept in one normal form: no '.', '..' or empty
# segments and no trailing '/'.
NORMAL_ABSOLUTE_PATTERN = re.compile(r"(/[^/\s]+)+")
_DOT_SEGMENT = re.compile(r"(^|/)[.][.]?(/|$)")
_PARENT_SEGMENT = re.compile(r"(^|/)[.][.](/|$)")
MAX_PATH_LENGTH = 4096
SHM_MOUNT_PATH = "/dev/shm"
# Paths the operator already mounts in the Ray container; Kubernetes refuses a second mount there.
RESERVED_MOUNT_PATHS: dict[str, str] = {
    SHM_MOUNT_PATH: "Ray's shared memory",
    C.TLS_MOUNT_PATH: "the api.tls Secret",
}


def _normal_absolute(path: str) -> str:
    if not NORMAL_ABSOLUTE_PATTERN.fullmatch(path) or _DOT_SEGMENT.search(path):
        raise ValueError("must be an absolute path without '.', '..' or empty segments and "
                         "without a trailing '/'")
    return path


def _descending(path: str) -> str:
    if path.startswith("/") or _PARENT_SEGMENT.search(path):
        raise ValueError("must be a relative path without '..' segments")
    return path


def _not_reserved_mount(path: str) -> str:
    if path in RESERVED_MOUNT_PATHS:
        raise ValueError(f"is where r1serve mounts {RESERVED_MOUNT_PATHS[path]}")
    return path


NormalPath = Annotated[str, Field(max_length=MAX_PATH_LENGTH), AfterValidator(_normal_absolute)]
MountPath = Annotated[NormalPath, AfterValidator(_not_reserved_mount)]
RelativePath = Annotated[str, Field(max_length=MAX_PATH_LENGTH),
                         AfterValidator(check_no_whitespace), AfterValidator(_descending)]


class NfsVolume(SpecModel):
    """An NFS export holding the checkpoint."""

    server: NonBlank = Field(description="Host name or IP address of the NFS server.")
    path: AbsolutePath = Field(description="Exported path on the server, e.g. /exports/models.")


class ModelVolume(SpecModel):
    """Where the checkpoint lives in Kubernetes; set exactly one of claimName, hostPath or nfs."""

    claim_name: ObjectName | None = Field(
        None,
        description="PersistentVolumeClaim (in the resource's namespace) holding the "
        "checkpoint; with several worker nodes it needs access mode ReadOnlyMany (or "
        "ReadWriteMany). Mounted read-only.",
    )
    host_path: NormalPath | None = Field(
        None,
        description="Directory on every node that runs a Ray pod, e.g. a node-local NVMe copy "
        "of the checkpoint; the pods fail to start where it does not exist. Mounted read-only.",
    )
    nfs: NfsVolume | None = Field(None, description="NFS export holding the checkpoint. "
                                  "Mounted read-only.")
    mount_path: MountPath = Field(
        "/models",
        description="Where the volume appears in every Ray pod (head and workers); "
        "model.source must be this path or lie under it. Absolute, no trailing '/'.",
    )
    sub_path: RelativePath | None = Field(
        None,
        description="Directory inside the volume to mount instead of its root (relative, "
        "no '..').",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelVolume":
        given = [(name, value) for name, value in (("claimName", self.claim_name),
                                                   ("hostPath", self.host_path), ("nfs", self.nfs))
                 if value is not None]
        if not given:
            raise FieldError("", "set one of claimName, hostPath or nfs")
        if len(given) > 1:
            names = " and ".join(name for name, _ in given)
            raise FieldError(given[1][0], f"set only one of claimName, hostPath or nfs, not "
                             f"{names}", given[1][1])
        return self


class ModelSpec(SpecModel):
    """Which checkpoint is served and how."""

    source: str = Field(
        min_length=1,
        # Bounded like every path, which also bounds the cost the API server estimates for
        # the CEL rules that read it.
        max_length=MAX_PATH_LENGTH,
        description="Where the checkpoint is: a directory on a mounted volume holding the "
        "Hugging Face layout (config.json, *.safetensors, tokenizer), e.g. "
        "/models/DeepSeek-R1, or 'tiny:' / 'tiny:<preset>' for a small random "
        "DeepSeek-V3-architecture checkpoint generated locally for demos and tests. With "
        "volume set, an absolute path under volume.mountPath.",
    )
    max_model_len: int = Field(
        32768,
        gt=0,
        description="Longest sequence (prompt plus generated tokens) a request may reach. "
        "The default, 32768, is DeepSeek's recommended generation budget for R1's long "
        "reasoning; it must not exceed the checkpoint's max_position_embeddings (checked "
        "when the model loads).",
    )
    dtype: Dtype = Field(
        "auto",
        description="Compute dtype: auto (bfloat16 on GPUs, float32 on CPU), bfloat16, "
        "float32 or float64 (reference checks). FP8 checkpoint weights are dequantized to it "
        "unless weights keeps them FP8.",
    )
    weights: WeightFormat = Field(
        "dequantized",
        description="How an FP8 checkpoint's projections are held (DeepSeek-V3/R1 publish theirs as "
        "e4m3 with one multiplier per 128x128 block). dequantized: converted to dtype when loading; "
        "the format whose greedy output is token-exact with the reference model. fp8: kept as "
        "published (half the memory and bytes read of bf16) and run as block-scaled FP8 matmuls with "
        "activations quantized per token in groups of 128; needs GPUs in every pool, and an FP8 "
        "checkpoint (checked when the replica starts). auto: fp8 for an FP8 checkpoint on GPUs with FP8 "
        "tensor cores (compute capability 8.9 and above), else dequantized; resolved where the replica "
        "starts. Routed experts are kept FP8 too; embeddings, lm_head, norms, the router and kv_b_proj "
        "are dequantized.",
    )
    served_model_name: NonBlank | None = Field(
        None,
        description="Model name clients pass in the OpenAI 'model' field and that responses "
        "report. Unset: metadata.name.",
    )
    num_routed_experts: int | None = Field(
        None,
        ge=1,
        description="Routed experts in the checkpoint (n_routed_experts in config.json, 256 "
        "for DeepSeek-R1). Optional: when set, expert divisibility across expertParallel "
        "ranks is checked when the resource is applied instead of when the model loads.",
    )
    volume: ModelVolume | None = Field(
        None,
        description="The Kubernetes volume holding the checkpoint, mounted read-only into every "
        "Ray pod (the Ingress on the head reads the tokenizer, the workers the weights). "
        "Unset: the image or the nodes must already hold source. Not allowed with a 'tiny:' "
        "source; ignored by the local runner.",
    )

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        if value.startswith(TINY_PREFIX):
            preset = value[len(TINY_PREFIX):]
            if preset and not PRESET_PATTERN.fullmatch(preset):
                raise ValueError(
                    "tiny preset must be lowercase letters, digits, '.', '_' or '-'")
        elif "://" in value:
            raise ValueError(
                "must be a path on a mounted volume or 'tiny:<preset>'; URLs are not "
                "downloaded")
        elif value != value.strip():
            raise ValueError("must not start or end with whitespace")
        return value

    @model_validator(mode="after")
    def _source_on_volume(self) -> "ModelSpec":
        if self.volume is None:
            return self
        if self.is_tiny:
            raise FieldError("volume", "must be omitted with a 'tiny:' source: tiny checkpoints "
                             "are generated in the pods, not read from a volume")
        mount = self.volume.mount_path
        under = self.source == mount or self.source.startswith(mount + "/")
        if not under or _PARENT_SEGMENT.search(self.source):
            raise FieldError("source", f"must be an absolute path under model.volume.mountPath "
                             f"({mount}) when model.volume is set", self.source)
        return self

    @property
    def is_tiny(self) -> bool:
        """True when the source names a generated tiny checkpoint rather than a path."""
        return self.source.startswith(TINY_PREFIX)

    @property
    def tiny_preset(self) -> str | None:
        """The tiny preset name ('default' for a bare 'tiny:'), or None for a path."""
        if not self.is_tiny:
            return None
        return self.source[len(TINY_PREFIX):] or DEFAULT_TINY_PRESET


class Experts(SpecModel):
    """Expert placement across the ranks of a replica (expert-parallel load balancing)."""

    redundant: int = Field(
        0,
        ge=0,
        le=4096,
        description="Extra copies of the most-loaded routed experts per replica, spread "
        "over the ranks so hot experts do not bottleneck one GPU (DeepSeek's EPLB). "
        "numRoutedExperts + redundant must be divisible by each pool's expertParallel.",
    )
    rebalance_interval_seconds: float | None = Field(
        None,
        gt=0,
        description="How often each expert-parallel replica re-places its experts from the "
        "expert load it measured (a decayed window: the load since the last rebalance counts "
        "fully, older load half as much per rebalance). Incoming experts load while the replica "
        "keeps serving; all its ranks switch at one step boundary. Unset: the placement "
        "computed at start-up is kept.",
    )
    collective_timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="How long a rank of an expert-parallel replica waits in a collective (the step's "
        "all-reduce, the experts' all-to-all) before it takes its group for broken. It bounds how long "
        "a dead or stuck rank goes unnoticed, and so how long streams stall before onRankFailure acts. "
        "Ranks meet before their first collective however long loading takes, so this needs to cover "
        "only the longest pause of one rank between two collectives (a first compile of a kernel for "
        "a new batch shape on GPUs).",
    )
    on_rank_failure: RankFailurePolicy = Field(
        "degrade",
        description="What an expert-parallel replica does when one of its ranks dies or its "
        "collectives time out. degrade: the surviving ranks form a group without it and keep "
        "serving: redundant copies take over its experts, experts left without a copy load from "
        "the checkpoint onto the survivors (within failoverHeadroomSlots), and its requests "
        "continue on the survivors from the tokens already streamed. restart: the replica fails "
        "every request on it with a retryable error and is replaced.",
    )
    grow_back_interval_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How often an expert-parallel replica serving without lost ranks "
        "(onRankFailure: degrade) tries to start them again in their places: their placement-group "
        "bundles, which Ray schedules again once their node or another one has room. Once the "
        "respawned ranks have loaded, every rank switches at one step boundary to the full group and "
        "an expert placement balanced from the load seen; streams go on.",
    )
    failover_headroom_slots: int = Field(
        0,
        ge=0,
        le=4096,
        description="How many expert slots each surviving rank may add, over those it started "
        "with, to take on experts that lost their last copy with a rank (onRankFailure: degrade). "
        "A loss that needs more fails the replica as restart would. 0: only redundant copies take "
        "over. Reserve the memory: each slot holds one routed expert per MoE layer.",
    )


class Speculative(SpecModel):
    """Speculative decoding: a draft model proposes the next tokens and the served model checks them
    in the step it runs anyway, so a decode step may emit several tokens. Greedy output is token for
    token what it is without it; sampled output keeps its distribution (rejection sampling)."""

    method: Literal["mtp"] = Field(
        "mtp",
        description="mtp: the checkpoint's multi-token-prediction layer drafts (DeepSeek-V3/R1 ship "
        "one: num_nextn_predict_layers in config.json must be at least 1; a replica of a "
        "checkpoint without it fails to start, naming this field). It keeps its own KV cache, "
        "handed off with the prompt's, and holds all its routed experts in every rank.",
    )
    num_tokens: int = Field(
        1,
        ge=1,
        le=1,
        description="Draft tokens per decode step; 1 (the layer predicts one token ahead).",
    )


class KVTransfer(SpecModel):
    """How a prompt's KV cache moves from a prefill replica to a decode replica."""

    connector: Connector = Field(
        "auto",
        description="nixl: rank to rank, one-sided (NIXL over UCX, GPU or CPU memory): the "
        "prefill rank keeps the prompt's latents until the decode rank reads them; needs the "
        "nixl package in the image. gloo: rank to rank between pools on CPUs, two-sided, over "
        "a link each decode rank makes to a prefill rank at their first hand-off. "
        "cuda-ipc: rank to rank on one machine (r1serve serve only, GPU pools): the decode "
        "rank copies the latents straight out of the prefill rank's GPU memory. "
        "object-store: through Ray's object store (host memory, works everywhere). auto: gloo "
        "for pools on CPUs; for pools with GPUs nixl where it can be imported, else "
        "object-store (the choice shows in r1serve status). nccl is refused: Ray's NCCL "
        "transport needs fixed collective groups, which cannot follow pools as they scale.",
    )
    timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a decode replica waits for a prompt's KV cache before the "
        "request fails and its blocks are freed.",
    )


def _not_reserved(port: int) -> int:
    if port in RESERVED_PORTS:
        reserved = ", ".join(str(p) for p in sorted(RESERVED_PORTS))
        raise ValueError(
            f"port {port} is reserved for {RESERVED_PORTS[port]} (reserved: {reserved})")
    return port


Port = Annotated[int, Field(ge=1, le=65535), AfterValidator(_not_reserved)]


class ApiAuth(SpecModel):
    """Bearer-token authentication of client requests; set at least one token source."""

    secret_name: ObjectName | None = Field(
        None,
        description="Kubernetes Secret (in the resource's namespace) whose key 'token' holds "
        "the accepted bearer token; used by the operator.",
    )
    token_file: NonBlank | None = Field(
        None,
        description="File holding the accepted bearer token; used when running locally or "
        "when the file is mounted into the pods.",
    )
    token_env: Annotated[str, AfterValidator(check_env_name)] | None = Field(
        None,
        description="Environment variable holding the accepted bearer token.",
    )

    @model_validator(mode="after")
    def _some_source(self) -> "ApiAuth":
        if self.secret_name is None and self.token_file is None and self.token_env is None:
            raise FieldError("", "set at least one of secretName, tokenFile or tokenEnv")
        return self


class ApiTLS(SpecModel):
    """TLS for the client-facing gRPC and HTTP endpoints; set secretName, or certFile and keyFile."""

    secret_name: ObjectName | None = Field(
        None,
        description="Kubernetes TLS Secret (type kubernetes.io/tls, keys tls.crt and "
        "tls.key) in the resource's namespace; the operator mounts it into the Ray pods.",
    )
    cert_file: AbsolutePath | None = Field(
        None,
        description="Absolute path of the PEM certificate chain; used when running locally or "
        "when the file is mounted into the pods. Needs keyFile.",
    )
    key_file: AbsolutePath | None = Field(
        None,
        description="Absolute path of the PEM private key of certFile. Needs certFile.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ApiTLS":
        has_files = self.cert_file is not None or self.key_file is not None
        if self.secret_name is not None and has_files:
            raise FieldError("secretName", "set either secretName or certFile and keyFile, "
                             "not both", self.secret_name)
        if self.secret_name is None and not has_files:
            raise FieldError("", "set secretName, or certFile and keyFile")
        if has_files and self.cert_file is None:
            raise FieldError("certFile", "required with keyFile")
        if has_files and self.key_file is None:
            raise FieldError("keyFile", "required with certFile")
        return self

    @property
    def cert_path(self) -> str:
        """Where the serving processes read the certificate (the operator mounts secretName there)."""
        return self.cert_file or f"{C.TLS_MOUNT_PATH}/{C.TLS_CERT_FILE}"

    @property
    def key_path(self) -> str:
        """Where the serving processes read the private key."""
        return self.key_file or f"{C.TLS_MOUNT_PATH}/{C.TLS_KEY_FILE}"


class ApiSpec(SpecModel):
    """The client-facing endpoints."""

    grpc_port: Port = Field(
        9000,
        description="Port of the gRPC endpoint (r1serve.v1.Inference). Must differ from "
        "httpPort and avoid Ray's ports 6379, 8265 and 10001 and 9001 (Serve's own gRPC "
        "proxy moves there when tls is set).",
    )
    http_port: Port = Field(
        8000,
        description="Port of the OpenAI-compatible HTTP endpoint (/v1/chat/completions, "
        "/v1/completions). Must differ from grpcPort and avoid the ports grpcPort avoids.",
    )
    auth: ApiAuth | None = Field(
        None, description="Bearer-token authentication. Unset: requests are not authenticated."
    )
    tls: ApiTLS | None = Field(
        None, description="TLS for both endpoints: Serve's HTTP proxy terminates it for HTTP, "
        "r1serve's gRPC TLS front (one extra local hop) for gRPC. Unset: plaintext."
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ApiSpec":
        if self.grpc_port == self.http_port:
            raise FieldError("httpPort", "must differ from grpcPort", self.http_port)
        return self


class Ratio(SpecModel):
    """Band for prefill replicas divided by decode replicas, kept by the autoscaler."""

    min: float = Field(
        gt=0, description="Lowest prefill:decode replica ratio the autoscaler allows."
    )
    max: float = Field(
        gt=0, description="Highest prefill:decode replica ratio the autoscaler allows; >= min."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "Ratio":
        if self.min > self.max:
            raise FieldError("min", f"must be <= max ({self.max:g})", self.min)
        return self
