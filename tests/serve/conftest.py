"""One local Ray + Serve per test session, with the application redeployed per graph (mock, P/D, single pool)."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

from r1serve.spec import constants as C
from r1serve.spec import load_r1deployment
from r1serve.spec.serve_config import build_serve_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_doc(**spec_overrides) -> dict:
    """examples/tiny.yaml with one decode replica (stats calls then reach the only replica)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["decode"]["replicas"] = {"min": 1, "max": 1}
    doc["spec"].update(copy.deepcopy(spec_overrides))
    return doc


def limited_doc() -> dict:
    """A tiny decode queue, so a handful of concurrent requests reaches back-pressure."""
    doc = tiny_doc()
    doc["spec"]["decode"].update(maxRunningRequests=2, maxQueuedRequests=1)
    doc["spec"]["decode"]["autoscaling"]["targetOngoingRequests"] = 1
    return doc


def single_pool_doc() -> dict:
    doc = tiny_doc()
    del doc["spec"]["prefill"]
    doc["spec"]["disaggregation"] = False
    return doc


class Cluster:
    """The session's Serve instance; `deploy` swaps the application only when the graph changes."""

    def __init__(self, grpc_port: int, http_port: int):
        self.grpc_port, self.http_port = grpc_port, http_port
        self._current = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self, doc: dict, engine: dict | None = None) -> dict:
        from r1serve.runtime.serve import local

        doc = copy.deepcopy(doc)
        doc["spec"]["api"] = {"grpcPort": self.grpc_port, "httpPort": self.http_port}
        config = build_serve_config(load_r1deployment(doc))
        return local.with_engine(config, engine) if engine else config

    def deploy(self, doc: dict, engine: dict | None = None) -> dict:
        from r1serve.runtime.serve import local

        config = self.config(doc, engine)
        if config != self._current:
            local.deploy_config(config, timeout_s=300)
            local.wait_for_http(self.http_port, 60)
            self._current = config
        return config

    def stats(self, pool: str) -> dict:
        from ray import serve

        name = C.POOL_DEPLOYMENTS[pool]
        return serve.get_deployment_handle(name, C.SERVE_APP_NAME).stats.remote().result(timeout_s=30)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Ray and Serve started once; tiny checkpoints go to a session cache."""
    import os

    import ray
    from ray import serve

    from r1serve.runtime.serve import local
    from r1serve.runtime.serve.checkpoint import CACHE_ENV, ensure_checkpoint

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("r1serve-cache"))
    # Replicas push autoscaling metrics every 10 s by default; the autoscaling tests need 1 s. Set
    # before Ray starts, so the raylet passes it to every replica.
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    deployment = load_r1deployment(tiny_doc())
    ensure_checkpoint(deployment.spec.model)
    local.init_ray(deployment, include_dashboard=False,
                   extra_resources={name: 8.0 for name in C.POOL_RAY_RESOURCES.values()})
    cluster = Cluster(free_port(), free_port())
    local.start_proxies(cluster.config(tiny_doc()))
    yield cluster
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def served_checkpoint(cluster) -> Path:
    from r1serve.runtime.serve.checkpoint import checkpoint_dir

    return checkpoint_dir(load_r1deployment(tiny_doc()).spec.model)


class Docs:
    tiny = staticmethod(tiny_doc)
    single_pool = staticmethod(single_pool_doc)
    limited = staticmethod(limited_doc)


@pytest.fixture(scope="session")
def docs() -> type[Docs]:
    """Spec documents of the graphs under test (fixtures, since tests cannot import conftest)."""
    return Docs
