"""The graph's behaviour with a mock engine: back-pressure, cancellation and deadlines free every pool,
health and reflection work for generic gRPC tools."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MOCK = {"kind": "mock", "token_delay_s": 0.02}


def long_request(tokens: int = 400) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="tell me a long story", sampling=pb.SamplingParams(max_tokens=tokens))


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s (last: {value!r})")
        time.sleep(0.05)


def idle(graph) -> bool:
    stats = {pool: graph.stats(pool) for pool in ("prefill", "decode")}
    return all(s["running"] == 0 and s["kv_blocks_used"] == 0 for s in stats.values()) and stats


@pytest.fixture(scope="module")
def graph(cluster, docs):
    cluster.deploy(docs.limited(), MOCK)
    return cluster


@pytest.fixture()
def channel(graph):
    with grpc.insecure_channel(graph.grpc_target) as channel:
        yield channel
    wait_until(lambda: idle(graph), what="both pools idle")


def test_cancel_mid_stream_frees_both_pools(graph, channel):
    stream = pb_grpc.InferenceStub(channel).Generate(long_request())
    first = next(stream)
    assert first.token_ids and not first.finished
    busy = graph.stats("decode")
    assert busy["running"] == 1 and busy["kv_blocks_used"] > 0
    stream.cancel()
    wait_until(lambda: idle(graph), what="blocks freed after cancel")


def test_deadline_is_honoured_and_frees_the_request(graph, channel):
    with pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.InferenceStub(channel).Generate(long_request(), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: idle(graph), what="blocks freed after the deadline")


def test_http_client_disconnect_frees_the_request(graph, channel):
    body = {"prompt": "tell me a long story", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{graph.http_url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert graph.stats("decode")["running"] == 1
    wait_until(lambda: idle(graph), what="blocks freed after disconnect")


def test_back_pressure_refuses_instead_of_queueing(graph, channel):
    """A decode replica takes 2 running + 1 queued requests and the Ingress' handle queues 1 more; the rest
    are refused at once (Serve also counts requests still being routed, so it may refuse a little early)."""
    stub = pb_grpc.InferenceStub(channel)
    codes, lock, threads = [], threading.Lock(), []
    streams = []

    def start(count: int) -> None:
        for _ in range(count):
            streams.append(stub.Generate(long_request(300)))
            threads.append(threading.Thread(target=drain, args=(streams[-1],)))
            threads[-1].start()

    def drain(s):
        try:
            for _ in s:
                pass
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            codes.append(code)

    # One at a time, each seen running: stats calls take a replica slot too, so two streams sent at
    # once could meet a stats call and one of them be refused before the pool is even full.
    for running in (1, 2):
        start(1)
        wait_until(lambda n=running: graph.stats("decode")["running"] == n, what=f"{running} running")
    start(4)
    wait_until(lambda: codes.count("RESOURCE_EXHAUSTED") >= 2, what="refusals")
    statuses, refusals, probes = http_probes(graph)
    wait_until(lambda: 429 in statuses, what="an HTTP refusal")
    error = refusals[0].json()["error"]
    assert error["type"] == "rate_limit_error" and refusals[0].headers["retry-after"] == "1"
    for s in streams:
        s.cancel()
    for t in threads + probes:
        t.join(timeout=30)
    assert sorted(codes).count("CANCELLED") >= 2 and set(codes) <= {"CANCELLED", "RESOURCE_EXHAUSTED"}


def http_probes(graph, concurrent: int = 3) -> tuple[list, list[httpx.Response], list[threading.Thread]]:
    """A few HTTP requests sent at once while the pool is full, the lists their statuses and refusals land
    in, and their threads: one
    that finds a free queue slot (Serve may refuse a gRPC stream early and leave one) waits in it, the
    others are refused."""
    body = {"prompt": "hi", "max_tokens": 5}
    statuses: list = []
    refusals: list[httpx.Response] = []

    def post() -> None:
        try:
            response = httpx.post(f"{graph.http_url}/v1/completions", json=body, timeout=60)
        except httpx.HTTPError as exc:
            statuses.append(type(exc).__name__)
            return
        statuses.append(response.status_code)
        if response.status_code == 429:
            refusals.append(response)

    probes = [threading.Thread(target=post) for _ in range(concurrent)]
    for probe in probes:
        probe.start()
    return statuses, refusals, probes


def test_health_and_reflection_for_generic_tools(graph, channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
    service = health.Check(health_pb2.HealthCheckRequest(service="r1serve.v1.Inference"), timeout=30)
    assert service.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=30))
    services = {s.name for s in answer.list_services_response.service}
    assert {"r1serve.v1.Inference", "grpc.health.v1.Health"} <= services


def test_model_info_and_models(graph, channel):
    info = pb_grpc.InferenceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.model, info.max_model_len, info.disaggregated) == ("tiny", 2048, True)
    assert (info.prefill_expert_parallel, info.decode_expert_parallel, info.kv_connector) == (2, 2, "object-store")
    models = httpx.get(f"{graph.http_url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
