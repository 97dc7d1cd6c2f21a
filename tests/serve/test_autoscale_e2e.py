"""Autoscaling end to end on a local graph (mock engine): a burst grows both pools, quiet shrinks them.

The decode pool scales on its own signal (running + waiting sequences); the prefill pool follows it
through the spec's prefill:decode ratio band (1:1), which the application-level policy enforces — the
mock engine queues no prompt tokens. Every request sent during growth and shrinkage must complete
in full: a replica being removed gets no new requests and finishes its running ones first. With
`min: 0` both pools sleep, and the first request waits for them to wake instead of failing.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from r1serve.spec import constants as C

pytestmark = pytest.mark.slow
MOCK = {"kind": "mock", "token_delay_s": 0.05}
MAX_TOKENS = 60  # ~3 s per request
LOOK_BACK_S = 2.0  # above the 1 s metric push interval the session's Ray runs with (conftest)


def autoscaling_doc(docs) -> dict:
    doc = docs.tiny()
    scaling = {"upscaleDelaySeconds": 1, "downscaleDelaySeconds": 4}
    for pool in ("prefill", "decode"):
        doc["spec"][pool].update(replicas={"min": 1, "max": 2}, expertParallel=1)
    doc["spec"]["prefill"]["autoscaling"] = {**scaling, "targetQueuedTokens": 2048}
    doc["spec"]["decode"]["autoscaling"] = {**scaling, "targetOngoingRequests": 2}
    doc["spec"]["ratio"] = {"min": 1, "max": 1}
    doc["spec"]["workers"] = {"resources": {"cpu": "1", "memory": "1Gi"}}
    return doc


def running_replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications[C.SERVE_APP_NAME]
    return {pool: int(app.deployments[name].replica_states.get("RUNNING", 0))
            for pool, name in C.POOL_DEPLOYMENTS.items()}


def wait_for(counts: dict[str, int], timeout_s: float, seen: list) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = running_replicas()
        seen.append(now)
        if now == counts:
            return
        time.sleep(0.5)
    raise AssertionError(f"replicas never reached {counts}; last seen {seen[-5:]}")


def deploy(cluster, doc: dict):
    from r1serve.runtime.serve import local

    config = copy.deepcopy(cluster.config(doc, MOCK))
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] in C.POOL_DEPLOYMENTS.values():
            dep["autoscaling_config"]["look_back_period_s"] = LOOK_BACK_S
    local.deploy_config(config, timeout_s=300)
    local.wait_for_http(cluster.http_port, 60)
    cluster._current = config  # the next module's deploy replaces this graph
    return cluster


@pytest.fixture()
def graph(cluster, docs):
    return deploy(cluster, autoscaling_doc(docs))


class Load:
    """`concurrency` clients sending completions back to back until stopped; every result is kept."""

    def __init__(self, url: str, concurrency: int):
        self.url, self.concurrency = url, concurrency
        self.stop = threading.Event()
        self.results: list[tuple[int, int]] = []  # (status code, completion tokens)
        self._pool = ThreadPoolExecutor(concurrency)
        self._futures = []

    def __enter__(self):
        self._futures = [self._pool.submit(self._client) for _ in range(self.concurrency)]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for future in self._futures:
            future.result(timeout=120)
        self._pool.shutdown()

    def _client(self) -> None:
        body = {"prompt": "tell me a story", "max_tokens": MAX_TOKENS, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                response = client.post(f"{self.url}/v1/completions", json=body)
                tokens = response.json().get("usage", {}).get("completion_tokens", 0) if response.is_success else 0
                self.results.append((response.status_code, tokens))


def test_a_burst_grows_both_pools_and_quiet_shrinks_them_without_losing_a_request(graph):
    seen: list = []
    assert running_replicas() == {"prefill": 1, "decode": 1}
    with Load(graph.http_url, concurrency=8) as burst:
        wait_for({"prefill": 2, "decode": 2}, 90, seen)
    with Load(graph.http_url, concurrency=1) as trickle:  # light traffic while replicas are removed
        wait_for({"prefill": 1, "decode": 1}, 90, seen)
    results = burst.results + trickle.results
    assert results and all(result == (200, MAX_TOKENS) for result in results), results
    status = httpx.get(f"{graph.http_url}{C.SCALING_STATUS_ROUTE}", timeout=30).json()
    decode = status["pools"]["decode"]
    assert decode["currentReplicas"] == 1
    assert decode["lastScaleDecision"]["signal"] == "running + waiting sequences"
    assert status["pools"]["prefill"]["currentReplicas"] == 1 and status["pools"]["prefill"]["lastScaleDecision"]
    assert decode["engine"]["kernels"] == "mock"  # each replica says how its engine runs


def test_pools_at_zero_wake_for_the_first_request_and_sleep_again(cluster, docs):
    doc = autoscaling_doc(docs)
    del doc["spec"]["ratio"]
    for pool in ("prefill", "decode"):
        doc["spec"][pool]["replicas"] = {"min": 0, "max": 1}
    graph = deploy(cluster, doc)
    seen: list = []
    wait_for({"prefill": 0, "decode": 0}, 30, seen)
    body = {"prompt": "wake up", "max_tokens": 5, "ignore_eos": True}
    response = httpx.post(f"{graph.http_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
    wait_for({"prefill": 0, "decode": 0}, 60, seen)  # back to zero after the downscale delay
