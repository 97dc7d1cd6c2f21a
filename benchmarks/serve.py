"""Serving-layer benchmark: the bare in-process engine, the single-pool graph and the disaggregated graph.

    python benchmarks/serve.py [--requests 200] [--rates 4 1000] [--expert-parallel 1] [--record]

Workload (seeded): Poisson arrivals at each rate (req/s; a rate far above capacity is the high-concurrency
case), prompts of 16-128 random token ids, 16-96 output tokens, greedy with end-of-sequence ignored.
The same requests go to: the engine in this process (AsyncEngine, no serving layer), then over gRPC
streaming (r1serve.v1.Inference/Generate) to the single-pool graph and to the disaggregated graph,
each deployed from the same spec (examples/tiny.yaml with the sizes below) on one local Ray.
TTFT and end-to-end latency count from the scheduled arrival; TPOT is per request, (last - first) /
(tokens - 1). Goodput: requests/s that meet both the TTFT and the TPOT objective.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
ANALYSIS = (
    "At a moderate rate the graphs match the bare engine's throughput and TPOT and add 30-45 ms to TTFT "
    "(three handle hops and the gRPC proxy; for the disaggregated graph also the KV hand-off through the "
    "object store). At saturation the single-pool graph reached 0.81 of the bare engine here (0.77 in "
    "another run; the machine is shared, so repeat runs spread by several percent) and the disaggregated "
    "graph, whose two pools share the same two cores, 0.78. What it costs: each streamed message takes about "
    "620 us of CPU in the Ingress, 460 us in the gRPC proxy, 290 us in the pool replica and 90 us in the "
    "client (measured with the mock engine at 1.2k messages/s), while the engine wants both cores. So a "
    "replica running at least half its maxRunningRequests sends each request's tokens at most every 200 ms, "
    "and outputs that pile up are merged; TPOT percentiles then measure that delivery cadence rather than "
    "the engine. TTFT under a burst is higher than the bare engine's because each request is admitted "
    "through Serve's router, which waits for the busy replica to accept it."
)
GRPC_PORT, HTTP_PORT = 19400, 18400


@dataclass
class Result:
    arrival: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Run:
    name: str
    rate: float
    wall: float
    results: list[Result] = field(default_factory=list)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1000, 100000) for _ in range(rng.randint(16, 128))], rng.randint(16, 96)) for _ in range(n)]


def arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def spec_doc(disaggregated: bool, expert_parallel: int, max_running: int, rank_cpus: int) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    pool = {"replicas": {"min": 1, "max": 1}, "expertParallel": expert_parallel, "gpusPerRank": 0,
            "maxBatchTokens": 2048, "maxRunningRequests": max_running, "maxQueuedRequests": 1024,
            "blockSize": 16, "kvCacheBlocks": 2048}
    doc["spec"]["decode"] = {**copy.deepcopy(pool), "autoscaling": {"targetOngoingRequests": max_running}}
    if disaggregated:
        doc["spec"]["prefill"] = copy.deepcopy(pool)
    else:
        doc["spec"].pop("prefill")
        doc["spec"]["disaggregation"] = False
    doc["spec"]["api"] = {"grpcPort": GRPC_PORT, "httpPort": HTTP_PORT}
    doc["spec"]["workers"]["resources"]["cpu"] = str(rank_cpus)
    return doc


async def drive(send, requests, times) -> tuple[list[Result], float]:
    """Start each request at its arrival time; `send(prompt, n, result)` fills in the result."""
    start = time.perf_counter()
    results = [Result(arrival=start + t) for t in times]

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, results[i].arrival - time.perf_counter()))
        try:
            await send(*requests[i], results[i])
        except Exception as exc:  # noqa: BLE001 - recorded, reported as failed requests
            results[i].error = f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    return results, time.perf_counter() - start


def mark(result: Result, count: int) -> None:
    if count:
        now = time.perf_counter()
        result.first = result.first or now
        result.last = now
        result.tokens += count


async def bare_engine(deployment, checkpoint, requests, times) -> tuple[list[Result], float]:
    from r1serve.runtime.engine.async_engine import AsyncEngine
    from r1serve.runtime.engine.engine import LLMEngine
    from r1serve.runtime.engine.sampling import SamplingParams
    from r1serve.runtime.serve.pool_plan import engine_config

    # The decode pool's engine, doing prefill too: the served graph without its Serve hops.
    config = dataclasses.replace(engine_config(deployment, "decode"), role="both")
    engine = AsyncEngine(LLMEngine.from_checkpoint(checkpoint, config))
    counter = iter(range(10**9))

    async def send(prompt, n, result):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        async for out in engine.generate(f"b{next(counter)}", prompt, params):
            mark(result, len(out.token_ids))

    try:
        await drive(send, requests[:8], [0.0] * 8)  # warm-up
        return await drive(send, requests, times)
    finally:
        engine.shutdown()


async def graph(requests, times) -> tuple[list[Result], float]:
    import grpc

    from r1serve.protos.r1serve.v1 import inference_pb2 as pb
    from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def send(prompt, n, result):
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
                max_tokens=n, temperature=0, ignore_eos=True))
            async for response in stub.Generate(request, timeout=600):
                mark(result, len(response.token_ids))

        await drive(send, requests[:8], [0.0] * 8)  # warm-up: replicas' first batches, routers, channels
        return await drive(send, requests, times)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(run: Run, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in run.results if r.error is None and r.first is not None]
    ttft = [r.first - r.arrival for r in ok]
    tpot = [(r.last - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1]
    e2e = [r.last - r.arrival for r in ok]
    good = [r for r in ok if r.first - r.arrival <= slo_ttft
            and (r.tokens <= 1 or (r.last - r.first) / (r.tokens - 1) <= slo_tpot)]
    return {"name": run.name, "rate": run.rate, "ok": len(ok), "failed": len(run.results) - len(ok),
            "tok_s": sum(r.tokens for r in ok) / run.wall, "req_s": len(ok) / run.wall,
            "goodput": len(good) / run.wall, "ttft": [pct(ttft, q) for q in (50, 90, 99)],
            "tpot": [pct(tpot, q) for q in (50, 90, 99)], "e2e": [pct(e2e, q) for q in (50, 90, 99)]}


def ms(values: list[float]) -> str:
    return " / ".join(f"{v * 1e3:.0f}" for v in values)


def table(rows: list[dict], bare: dict[float, float]) -> str:
    headers = ["target", "rate req/s", "ok/failed", "output tok/s", "vs bare", "req/s", "goodput req/s",
               "TTFT p50/90/99 ms", "TPOT p50/90/99 ms", "E2E p50/90/99 ms"]
    body = [[r["name"], f"{r['rate']:g}", f"{r['ok']}/{r['failed']}", f"{r['tok_s']:.0f}",
             f"{r['tok_s'] / bare[r['rate']]:.2f}", f"{r['req_s']:.2f}", f"{r['goodput']:.2f}", ms(r["ttft"]),
             ms(r["tpot"]), ms(r["e2e"])] for r in rows]
    return markdown_table(headers, body)


def deploy(doc: dict) -> None:
    from r1serve.runtime.serve import local
    from r1serve.spec import load_r1deployment
    from r1serve.spec.serve_config import build_serve_config

    config = build_serve_config(load_r1deployment(doc))
    local.deploy_config(config, timeout_s=600)
    local.wait_for_http(HTTP_PORT, 120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 1000.0])
    parser.add_argument("--expert-parallel", type=int, default=1, help="ranks per replica in both pools")
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--rank-cpus", type=int, default=1,
                        help="workers.resources.cpu: torch threads of each replica's engine (the bare engine "
                        "keeps torch's default); on a 2-core machine 1 leaves a core to Serve and the client")
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="goodput objective, seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.1, help="goodput objective, seconds")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()

    import ray
    from ray import serve

    from r1serve.runtime.serve import local
    from r1serve.runtime.serve.checkpoint import ensure_checkpoint
    from r1serve.spec import load_r1deployment
    from r1serve.spec.serve_config import build_serve_config

    requests = workload(args.requests)
    docs = {name: spec_doc(name == "disaggregated", args.expert_parallel, args.max_running, args.rank_cpus)
            for name in ("single-pool", "disaggregated")}
    deployments = {name: load_r1deployment(doc) for name, doc in docs.items()}
    checkpoint = ensure_checkpoint(deployments["single-pool"].spec.model)
    runs = []
    for rate in args.rates:
        times = arrivals(len(requests), rate)
        results, wall = asyncio.run(bare_engine(deployments["single-pool"], checkpoint, requests, times))
        runs.append(Run("bare engine", rate, wall, results))
        print(f"bare engine @ {rate:g} req/s: {sum(r.tokens for r in results) / wall:.0f} tok/s", flush=True)
    local.init_ray(deployments["disaggregated"], include_dashboard=False)
    local.start_proxies(build_serve_config(deployments["single-pool"]))
    try:
        for name in ("single-pool", "disaggregated"):
            deploy(docs[name])
            for rate in args.rates:
                results, wall = asyncio.run(graph(requests, arrivals(len(requests), rate)))
                runs.append(Run(name, rate, wall, results))
                errors = {r.error for r in results if r.error}
                print(f"{name} @ {rate:g} req/s: {sum(r.tokens for r in results) / wall:.0f} tok/s"
                      + (f", errors: {sorted(errors)[:3]}" if errors else ""), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = [summarize(run, args.slo_ttft, args.slo_tpot) for run in runs]
    bare = {r["rate"]: r["tok_s"] for r in rows if r["name"] == "bare engine"}
    text = table(rows, bare)
    print(text)
    if args.record:
        intro = (f"## Serving layer: bare engine vs single-pool and disaggregated graphs\n\n{args.requests} requests, "
                 f"prompts 16-128 tokens, outputs 16-96 tokens, greedy; expertParallel {args.expert_parallel}, "
                 f"maxRunningRequests {args.max_running}, {args.rank_cpus} CPU per rank; "
                 f"goodput objectives TTFT <= {args.slo_ttft:g} s and "
                 f"TPOT <= {args.slo_tpot * 1e3:g} ms. \"vs bare\" is output tokens/s relative to the bare engine "
                 "at the same arrival rate.\n\n")
        record("serve", intro + text + "\n\n" + ANALYSIS)


if __name__ == "__main__":
    main()
