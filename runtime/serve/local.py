"""Embedded local mode: `r1serve serve FILE.yaml` runs the Kubernetes graph on a Ray inside this process.

The Serve config deployed is exactly `build_serve_config(deployment)`, the one the operator writes into
the RayService: Serve is started with its gRPC and HTTP options, then its applications go to the
controller the way `serve deploy` and KubeRay send them. With `api.tls`, the gRPC TLS front the
operator runs as a sidecar runs here in a thread instead.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import ssl
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from r1serve.spec import R1Deployment, load_r1deployment
from r1serve.spec import constants as C
from r1serve.spec.serve_config import build_serve_config, local_ray_resources

from .app import ARG_ENGINE
from .checkpoint import CACHE_ENV, cache_root, ensure_checkpoint
from .grpc_tls import TLSFrontThread

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
DEPLOY_TIMEOUT_S = 600.0
POLL_S = 0.5


def ray_cpus(config: Mapping[str, Any]) -> float:
    """Logical CPUs a single node needs to place every deployment at its maximum replica count."""
    total = 0.0
    for dep in config["applications"][0]["deployments"]:
        per_replica = sum(b.get("CPU", 0.0) for b in dep.get("placement_group_bundles", [])) \
            or dep.get("ray_actor_options", {}).get("num_cpus", 1.0)
        total += per_replica * dep["autoscaling_config"]["max_replicas"]
    return total + 1.0  # headroom for Serve's controller and proxies' tasks


def init_ray(deployment: R1Deployment, *, address: str | None = None, include_dashboard: bool = True,
             extra_resources: Mapping[str, float] | None = None) -> None:
    """Start (or join) Ray with the logical resources the deployment's placement groups ask for."""
    import ray

    # Replicas resolve `tiny:` models to the same cache as this process (they inherit the raylet's env).
    os.environ[CACHE_ENV] = str(cache_root())
    if address:
        ray.init(address=address, runtime_env={"env_vars": {CACHE_ENV: os.environ[CACHE_ENV]}})
        return
    resources = {**local_ray_resources(deployment), **(extra_resources or {})}
    ray.init(num_cpus=int(ray_cpus(build_serve_config(deployment))) + 1, resources=resources,
             include_dashboard=include_dashboard, configure_logging=True, logging_level=logging.WARNING)


def start_proxies(config: Mapping[str, Any], host: str = LOCAL_HOST) -> None:
    """serve.start with the config's gRPC options and HTTP port (on `host`); fixed for Serve's lifetime."""
    from ray import serve

    http = {**config["http_options"], "host": host}
    serve.start(http_options=http, grpc_options=dict(config["grpc_options"]))


def deploy_config(config: Mapping[str, Any], *, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Send the config's applications to the Serve controller and wait until they are RUNNING."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(dict(config)))
    wait_until_running(config["applications"][0]["name"], timeout_s)


def wait_until_running(app_name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = app.status if app is not None else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {app_name} failed to deploy: {app.message}")
        time.sleep(POLL_S)
    raise TimeoutError(f"application {app_name} is not RUNNING after {timeout_s:g}s (last status {status})")


def with_engine(config: Mapping[str, Any], engine: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config whose replicas use another engine: an EngineSource as a mapping, e.g. {"kind": "mock"}."""
    patched = copy.deepcopy(dict(config))
    patched["applications"][0]["args"][ARG_ENGINE] = dict(engine)
    return patched


def wait_for_http(port: int, timeout_s: float, host: str = LOCAL_HOST, *, tls: bool = False) -> None:
    """Until the HTTP proxy routes to the Ingress (it starts after the application is RUNNING)."""
    deadline = time.monotonic() + timeout_s
    scheme = "https" if tls else "http"
    # Polling our own proxy for readiness, not trusting it with anything: the certificate (maybe
    # self-signed, maybe not for this host name) is not checked here.
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    while True:
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=5,
                                        context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(POLL_S)


def endpoints(deployment: R1Deployment, host: str = "localhost") -> dict[str, str]:
    """Where clients connect: api.grpcPort (the TLS front when api.tls is set) and the HTTP API."""
    api = deployment.spec.api
    scheme = "https" if api.tls is not None else "http"
    return {"grpc": f"{host}:{api.grpc_port}", "http": f"{scheme}://{host}:{api.http_port}/v1"}


def check_tls_files(deployment: R1Deployment) -> None:
    """Fail before Ray starts when api.tls points at files this machine does not have."""
    tls = deployment.spec.api.tls
    if tls is None:
        return
    for field, path in (("certFile", tls.cert_path), ("keyFile", tls.key_path)):
        if not Path(path).is_file():
            hint = ("; secretName is mounted there only by the operator: set certFile and keyFile "
                    "to serve TLS locally" if tls.secret_name else "")
            raise FileNotFoundError(f"spec.api.tls.{field}: no such file {path}{hint}")


def start_tls_front(deployment: R1Deployment, host: str = LOCAL_HOST) -> TLSFrontThread | None:
    """With api.tls: the gRPC TLS front on host:api.grpcPort, forwarding to Serve's gRPC proxy."""
    tls = deployment.spec.api.tls
    if tls is None:
        return None
    listen = f"{host}:{deployment.spec.api.grpc_port}"
    front = TLSFrontThread(listen, f"{LOCAL_HOST}:{C.GRPC_BACKEND_PORT}", tls.cert_path, tls.key_path)
    try:
        front.start()
    except RuntimeError as exc:  # grpc could not bind
        front.stop(0)
        raise RuntimeError(f"spec.api.grpcPort: the gRPC TLS front cannot listen on {listen}: "
                           f"{exc}") from exc
    except BaseException:
        front.stop(0)
        raise
    return front


def serve_file(path: Path, *, address: str | None = None, host: str = LOCAL_HOST,
               stop: threading.Event | None = None) -> int:
    """`r1serve serve`: deploy the R1Deployment in `path`, serve until Ctrl-C (or `stop`), shut down."""
    import ray
    from ray import serve

    deployment = load_r1deployment(path)
    check_tls_files(deployment)
    checkpoint = ensure_checkpoint(deployment.spec.model)  # once, here, before any replica starts
    print(f"model: {deployment.spec.model.source} -> {checkpoint}", flush=True)
    config = build_serve_config(deployment)
    tls = deployment.spec.api.tls is not None
    front = None
    try:
        front = start_tls_front(deployment, host)  # first: a taken port fails before Ray starts
        init_ray(deployment, address=address)
        start_proxies(config, host)
        deploy_config(config)
        wait_for_http(config["http_options"]["port"], 60.0, host, tls=tls)
        urls = endpoints(deployment, "localhost" if host == LOCAL_HOST else host)
        grpc_note = (f"over TLS (front -> Serve's plaintext gRPC proxy on :{C.GRPC_BACKEND_PORT})"
                     if tls else "plaintext")
        print(f"serving {deployment.served_model_name} ({C.SERVE_APP_NAME}):\n"
              f"  gRPC  {urls['grpc']}  r1serve.v1.Inference (health, reflection), {grpc_note}\n"
              f"  HTTP  {urls['http']}  OpenAI-compatible: /chat/completions, /completions, /models\n"
              "Ctrl-C to stop.", flush=True)
        stop = stop or _interrupt_event()  # after ray.init, which installs handlers of its own
        while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        print("shutting down", flush=True)
        try:
            if front is not None:  # first, so its clients see a clean close rather than a dead backend
                front.stop()
        finally:
            if ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
    return 0


def _interrupt_event() -> threading.Event:
    """Set by SIGINT/SIGTERM, so the main thread leaves `wait` and shuts Serve down in order."""
    event = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: event.set())
    return event
