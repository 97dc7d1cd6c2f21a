"""Embedded local mode: `r1serve serve FILE.yaml` runs the Kubernetes graph on a Ray inside this process.

The Serve config deployed is exactly `build_serve_config(deployment)`, the one the operator writes into
the RayService: Serve is started with its gRPC and HTTP options, then its applications go to the
controller the way `serve deploy` and KubeRay send them.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
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
    """A copy of the config whose replicas use another engine (tests: {"kind": "mock"})."""
    patched = copy.deepcopy(dict(config))
    patched["applications"][0]["args"][ARG_ENGINE] = dict(engine)
    return patched


def wait_for_http(port: int, timeout_s: float, host: str = LOCAL_HOST) -> None:
    """Until the HTTP proxy routes to the Ingress (it starts after the application is RUNNING)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(POLL_S)


def endpoints(config: Mapping[str, Any], host: str = "localhost") -> dict[str, str]:
    return {"grpc": f"{host}:{config['grpc_options']['port']}",
            "http": f"http://{host}:{config['http_options']['port']}/v1"}


def serve_file(path: Path, *, address: str | None = None, host: str = LOCAL_HOST,
               stop: threading.Event | None = None) -> int:
    """`r1serve serve`: deploy the R1Deployment in `path`, serve until Ctrl-C (or `stop`), shut down."""
    import ray
    from ray import serve

    deployment = load_r1deployment(path)
    checkpoint = ensure_checkpoint(deployment.spec.model)  # once, here, before any replica starts
    print(f"model: {deployment.spec.model.source} -> {checkpoint}", flush=True)
    config = build_serve_config(deployment)
    try:
        init_ray(deployment, address=address)
        start_proxies(config, host)
        deploy_config(config)
        wait_for_http(config["http_options"]["port"], 60.0, host)
        urls = endpoints(config, "localhost" if host == LOCAL_HOST else host)
        print(f"serving {deployment.served_model_name} ({C.SERVE_APP_NAME}):\n"
              f"  gRPC  {urls['grpc']}  r1serve.v1.Inference (health, reflection)\n"
              f"  HTTP  {urls['http']}  OpenAI-compatible: /chat/completions, /completions, /models\n"
              "Ctrl-C to stop.", flush=True)
        stop = stop or _interrupt_event()  # after ray.init, which installs handlers of its own
        while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        print("shutting down", flush=True)
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
