"""Soak on the local graph with the real tiny model: 256 concurrent greedy streams, half over gRPC and half over
HTTP, all complete and equal to the in-process engine's output; then thousands of short requests, after which
both pools are back to zero KV blocks and the replicas' memory has not kept growing."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc
from r1serve.runtime.engine.detokenizer import IncrementalDetokenizer
from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.serve import client
from r1serve.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
CONCURRENT = 256
MAX_TOKENS = 4
SHORT_REQUESTS = 2048
SHORT_CONCURRENCY = 64
RSS_GROWTH_LIMIT = 1.25  # after / after-warm-up, per replica process


def soak_doc(docs) -> dict:
    doc = docs.tiny()
    for pool in ("prefill", "decode"):
        doc["spec"][pool].update(maxRunningRequests=64, maxQueuedRequests=512)
    return doc


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 100000) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def graph(cluster, docs):
    cluster.deploy(soak_doc(docs))
    return cluster


@pytest.fixture(scope="module")
def reference(served_checkpoint):
    """Greedy tokens and text of the in-process engine, one request at a time."""
    engine = LLMEngine.from_checkpoint(served_checkpoint, EngineConfig(num_blocks=256, block_size=16))
    tokenizer = Tokenizer.from_dir(served_checkpoint)

    def greedy(prompt: list[int]) -> tuple[list[int], str]:
        engine.add_request("ref", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        tokens = []
        while engine.has_work:
            for out in engine.step():
                tokens += out.token_ids
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, True)
        return tokens, detokenizer.push(tokens) + detokenizer.flush()

    return greedy


def idle(graph) -> bool:
    stats = {pool: graph.stats(pool) for pool in ("prefill", "decode")}
    return all(s["running"] == 0 and s["kv_blocks_used"] == 0 for s in stats.values())


def wait_idle(graph, timeout_s: float = 60.0) -> float:
    start = time.monotonic()
    while not idle(graph):
        assert time.monotonic() - start < timeout_s, "pools not idle"
        time.sleep(0.2)
    return time.monotonic() - start


def grpc_greedy(stub, prompt: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    tokens, finished = [], False
    for response in stub.Generate(request, metadata=client.METADATA, timeout=300):
        tokens += response.token_ids
        finished = finished or response.finished
    assert finished
    return tokens


def http_greedy(http: httpx.Client, prompt: list[int]) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    text, done = [], False
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += [c["text"] for c in chunk["choices"]]
    assert done
    return "".join(text)


def test_256_concurrent_streams_equal_the_reference(graph, reference, reliability):
    work = prompts(CONCURRENT)
    expected = [reference(p) for p in work]
    failures: list[str] = []
    lock = threading.Lock()
    with grpc.insecure_channel(graph.grpc_target) as channel, \
            httpx.Client(base_url=graph.http_url, timeout=300,
                         limits=httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)) as http:
        stub = pb_grpc.InferenceStub(channel)

        def one(i: int) -> bool:
            try:
                if i % 2 == 0:
                    ok = grpc_greedy(stub, work[i]) == expected[i][0]
                else:
                    ok = http_greedy(http, work[i]) == expected[i][1]
                if not ok:
                    with lock:
                        failures.append(f"{i}: output differs from the reference")
                return ok
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{i}: {type(exc).__name__}: {str(exc)[:200]}")
                return False

        start = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            results = list(pool.map(one, range(CONCURRENT)))
        duration = time.monotonic() - start
    settle = wait_idle(graph)
    reliability("soak-256-concurrent", "load", what=f"{CONCURRENT} concurrent greedy streams ({CONCURRENT // 2} "
                f"gRPC, {CONCURRENT // 2} HTTP SSE), real tiny model, {MAX_TOKENS} tokens each, compared with "
                f"the in-process engine; KV blocks of both pools back to 0 after {settle:.1f} s",
                requests=len(results), failed=results.count(False), failures="; ".join(failures[:5]),
                duration_s=duration)
    assert len(results) == CONCURRENT and not failures, failures[:10]


def replica_rss() -> dict[int, tuple[str, int]]:
    """pid -> (process title, RSS in bytes) of every Ray actor process of this session (replicas and their EP
    ranks): the local Ray's processes descend from this one."""
    import os

    import psutil

    rss = {}
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(process.cmdline())
            if title.startswith("ray::") and "IDLE" not in title:
                rss[process.pid] = (title, process.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss


def test_thousands_of_short_requests_leak_nothing(graph, reliability):
    work = prompts(SHORT_REQUESTS, seed=2)
    failures: list[str] = []
    with grpc.insecure_channel(graph.grpc_target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def one(prompt: list[int]) -> bool:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                         sampling=pb.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            try:
                return stub.GenerateUnary(request, metadata=client.METADATA, timeout=300).finished
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()[:100]}")
                return False

        with ThreadPoolExecutor(SHORT_CONCURRENCY) as pool:
            warm = list(pool.map(one, work[:256]))  # caches, pools and allocators reach their steady size
            wait_idle(graph)
            before = replica_rss()
            start = time.monotonic()
            rest = list(pool.map(one, work[256:]))
            duration = time.monotonic() - start
    settle = wait_idle(graph)
    after = replica_rss()
    growth = {f"{before[pid][0]}:{pid}": after[pid][1] / before[pid][1] for pid in before if pid in after}
    worst = max(growth.values())
    ok = warm + rest
    reliability("soak-short-requests", "load", what=f"{SHORT_REQUESTS} short greedy gRPC requests (2 tokens, "
                f"{SHORT_CONCURRENCY} at a time) after a 256-request warm-up; replica RSS after / before: worst "
                f"×{worst:.3f} over {len(growth)} Ray actor processes (replicas, EP ranks, Serve); "
                f"KV blocks back to 0 after {settle:.1f} s",
                requests=len(ok), failed=ok.count(False), failures="; ".join(failures[:5]), duration_s=duration)
    assert not failures and all(ok), failures[:10]
    replicas = {pid for pid, (title, _) in before.items() if "ServeReplica" in title}
    assert replicas, before
    assert replicas <= set(after), "a replica was replaced during the soak"
    assert worst < RSS_GROWTH_LIMIT, growth
