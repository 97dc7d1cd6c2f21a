"""What the gRPC TLS front costs: plaintext gRPC against the TLS front (and TLS served by the backend itself).

    python benchmarks/grpc_tls.py [--unary-calls 2000] [--stream-messages 2000] [--streams 32]
                                  [--messages-per-stream 1000]
                                  [--rounds 7] [--record]

A stand-in backend (a plaintext `grpc.aio` server implementing r1serve.v1.Inference, in its own spawned
process) answers `Generate` with a stream of GenerateResponse messages of one token id and a short text
piece each, as a decode stream does, and `GenerateUnary` with one message. The client (this process, one
`grpc.aio` channel per path) reaches it three ways: (1) plaintext straight to the backend, the baseline;
(2) over TLS to the TLS front (`runtime/serve/grpc_tls.py`, in its own process as in the Kubernetes
sidecar), which forwards every call as raw bytes to the backend over plaintext loopback, which is what
`spec.api.tls` deploys; (3) over TLS straight to the backend (`add_secure_port`), which separates the
cost of TLS from the cost of the extra hop. Self-signed ECDSA P-256 certificate; connections are made
and warmed up before timing, so no handshake is measured.

Measures per path: latency of sequential unary calls (p50/p99), messages/s of one stream and of N
concurrent streams, and CPU time of the front and the backend processes (user + system, all threads)
per 1,000 messages over the concurrent-stream phase. Ratios are against the plaintext path of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc
from r1serve.runtime.serve.grpc_tls import TLSFront
from r1serve.runtime.serve.self_signed import write_self_signed
from r1serve.spec.constants import TLS_CERT_FILE, TLS_KEY_FILE

HOST = "127.0.0.1"
UNARY_TOKENS = 16  # tokens in a unary answer
WARMUP = 50
# From the engine section of benchmarks/README.md (tiny model, this 2-core CPU): a decode step takes
# 4-29 ms and 32-64 concurrent sequences produce about 2,000 tokens/s; Serve's gRPC proxy behind the
# front spends about 460 us of CPU per streamed message (serving-layer section).
DECODE_STEP_MS = (4, 29)
ENGINE_TOKENS_PER_S = 2000
PROXY_CPU_US = 460


def piece(i: int) -> str:
    return f" w{i % 1000}"  # a few characters, like a detokenized token


class Backend(pb_grpc.InferenceServicer):
    """Answers at once: the figures are the transport's, not a model's."""

    async def Generate(self, request, context):
        n = request.sampling.max_tokens
        for i in range(n - 1):
            yield pb.GenerateResponse(request_id=request.request_id, content=piece(i), token_ids=[i])
        # The last message carries the finish reason, as the real server's does.
        yield pb.GenerateResponse(request_id=request.request_id, content=piece(n - 1), token_ids=[n - 1],
                                  finished=True, finish_reason=pb.FINISH_REASON_LENGTH)

    async def GenerateUnary(self, request, context):
        n = request.sampling.max_tokens
        return pb.GenerateResponse(request_id=request.request_id, content="".join(piece(i) for i in range(n)),
                                   token_ids=list(range(n)), finished=True,
                                   finish_reason=pb.FINISH_REASON_LENGTH)


def _serve_backend(cert: str, key: str, ports) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(Backend(), server)
        plain = server.add_insecure_port(f"{HOST}:0")
        creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
        secure = server.add_secure_port(f"{HOST}:0", creds)
        await server.start()
        ports.send((plain, secure))
        await server.wait_for_termination()

    asyncio.run(main())


def _serve_front(backend: str, cert: str, key: str, ports) -> None:
    async def main() -> None:
        front = TLSFront(f"{HOST}:0", backend, cert, key)
        ports.send(await front.start())
        await asyncio.Event().wait()

    asyncio.run(main())


def spawn(target, *args) -> tuple[mp.Process, object]:
    """Start `target(*args, pipe)` in a fresh interpreter; returns the process and what it sent back."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    if not ours.poll(60):
        proc.terminate()
        raise RuntimeError(f"{target.__name__} did not start")
    return proc, ours.recv()


def cpu_seconds(proc: mp.Process | None) -> float:
    if proc is None:
        return 0.0
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


@dataclass
class Route:
    name: str
    target: str
    root_cert: bytes | None  # None: plaintext
    front: mp.Process | None  # the process whose CPU the "front" column counts


def request(tokens: int, rid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(text="hi", request_id=rid, sampling=pb.SamplingParams(max_tokens=tokens))


async def stream(stub, tokens: int) -> int:
    count = 0
    async for _ in stub.Generate(request(tokens)):
        count += 1
    if count != tokens:
        raise RuntimeError(f"stream of {tokens} gave {count} messages")
    return count


def connect(route: Route) -> grpc.aio.Channel:
    if route.root_cert is None:
        return grpc.aio.insecure_channel(route.target)
    return grpc.aio.secure_channel(route.target, grpc.ssl_channel_credentials(route.root_cert))


async def warm_up(stub, args) -> None:
    """Connect (and finish the TLS handshake) before anything is timed."""
    for _ in range(WARMUP):
        await stub.GenerateUnary(request(UNARY_TOKENS))
    await asyncio.gather(*(stream(stub, 20) for _ in range(args.streams)))


async def measure(route: Route, stub, backend: mp.Process, args) -> dict:
    latencies = []
    for i in range(args.unary_calls):
        start = time.perf_counter()
        await stub.GenerateUnary(request(UNARY_TOKENS, str(i)))
        latencies.append(time.perf_counter() - start)
    latencies.sort()

    start = time.perf_counter()
    await stream(stub, args.stream_messages)
    one = args.stream_messages / (time.perf_counter() - start)

    front0, back0 = cpu_seconds(route.front), cpu_seconds(backend)
    start = time.perf_counter()
    total = sum(await asyncio.gather(*(stream(stub, args.messages_per_stream) for _ in range(args.streams))))
    many = total / (time.perf_counter() - start)
    front_cpu, back_cpu = cpu_seconds(route.front) - front0, cpu_seconds(backend) - back0
    return {"p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "one": one, "many": many, "front_cpu": front_cpu / total * 1e6 if route.front else None,
            "back_cpu": back_cpu / total * 1e6}  # CPU: ms per 1,000 messages


async def run_routes(routes: list[Route], backend: mp.Process, args) -> dict[str, list[dict]]:
    """Each route's figures from `args.rounds` rounds, the routes interleaved so that drift on a shared
    machine hits them alike."""
    channels = [connect(route) for route in routes]
    stubs = [pb_grpc.InferenceStub(channel) for channel in channels]
    try:
        for stub in stubs:
            await warm_up(stub, args)
        rounds: dict[str, list[dict]] = {route.name: [] for route in routes}
        for n in range(args.rounds):
            for route, stub in zip(routes, stubs):
                rounds[route.name].append(await measure(route, stub, backend, args))
                print(f"round {n + 1} {route.name}: {rounds[route.name][-1]}", file=sys.stderr, flush=True)
    finally:
        for channel in channels:
            await channel.close()
    return rounds


def medians(runs: list[dict]) -> dict:
    return {key: None if runs[0][key] is None else statistics.median(run[key] for run in runs) for key in runs[0]}


def ratios(base: dict, other: dict) -> str:
    return (f"{other['p50'] / base['p50']:.2f}x unary p50, {other['p99'] / base['p99']:.2f}x p99, "
            f"{other['one'] / base['one']:.2f}x single-stream msg/s, "
            f"{other['many'] / base['many']:.2f}x concurrent msg/s")


def spread(rounds: dict[str, list[dict]], name: str, key: str) -> str:
    """Lowest and highest ratio of route `name` to plaintext over the rounds."""
    values = [run[key] / base[key] for run, base in zip(rounds[name], rounds["plaintext"])]
    return f"{min(values):.2f}-{max(values):.2f}x"


def analysis(results: dict[str, dict], rounds: dict[str, list[dict]], args) -> str:
    """The paragraph recorded under the table, its figures from this run."""
    base, front, direct = results["plaintext"], results["TLS front"], results.get("TLS at the backend")
    hop_us = (front["p50"] - base["p50"]) * 1e6
    per_msg_us = (1 / front["one"] - 1 / base["one"]) * 1e6
    cpu_us = front["front_cpu"]  # ms per 1,000 messages = us per message
    text = (f"The TLS front adds {hop_us:.0f} us to a unary call at the median ({front['p50'] * 1e3:.2f} ms against "
            f"{base['p50'] * 1e3:.2f} ms plaintext) and {per_msg_us:.0f} us per message to a single stream "
            f"({front['one']:,.0f} against {base['one']:,.0f} msg/s); {args.streams} concurrent streams get "
            f"{front['many'] / base['many']:.0%} of the plaintext rate through it. ")
    if direct is not None:
        tls_us = (direct["p50"] - base["p50"]) * 1e6
        share = "most" if tls_us < hop_us / 2 else "part"
        crypto_us = direct["back_cpu"] - base["back_cpu"]  # the backend's CPU with TLS minus without
        text += (f"TLS served by the backend itself moves unary p50 by {tls_us:+.0f} us, the concurrent rate to "
                 f"{direct['many'] / base['many']:.0%} and the backend's CPU by {crypto_us:+.0f} us per message "
                 f"against plaintext, so {share} of the front's cost is the extra hop (a second gRPC server and "
                 "channel in Python, in a third process on the same cores) rather than the encryption. ")
    text += (f"Next to a decode step of {DECODE_STEP_MS[0]}-{DECODE_STEP_MS[1]} ms on this CPU (engine section) "
             f"the added latency, paid once per call (in TTFT) rather than summed over a stream, is "
             f"{hop_us / 10 / DECODE_STEP_MS[1]:.0f}-{hop_us / 1e3 / DECODE_STEP_MS[0]:.0%} of one step, and one "
             f"stream through the front still runs at {front['one'] / (1e3 / DECODE_STEP_MS[0]):.0f}x the fastest "
             f"decode rate. The front spends {cpu_us:.0f} us of CPU per message: at the engine's "
             f"~{ENGINE_TOKENS_PER_S:,} tokens/s, one message per token (an upper bound; Serve merges tokens "
             f"that pile up), that is {cpu_us * ENGINE_TOKENS_PER_S / 1e6:.0%} of one core, against about "
             f"{PROXY_CPU_US} us per message in Serve's gRPC proxy behind it (serving-layer section). The table "
             f"gives medians of {args.rounds} rounds; round by round the front's ratio to plaintext ranged "
             f"{spread(rounds, 'TLS front', 'p50')} for unary p50 and {spread(rounds, 'TLS front', 'many')} for "
             "the concurrent rate, since the client, the front and the backend share two cores with whatever "
             "else the machine runs.")
    return text


def measure_all(folder: Path, args) -> dict[str, list[dict]]:
    """Start the backend and the front, measure every route, stop them."""
    cert_pem = write_self_signed(folder, ("localhost", HOST))
    cert, key = folder / TLS_CERT_FILE, folder / TLS_KEY_FILE
    backend, (plain_port, secure_port) = spawn(_serve_backend, str(cert), str(key))
    front, front_port = spawn(_serve_front, f"{HOST}:{plain_port}", str(cert), str(key))
    try:
        routes = [Route("plaintext", f"{HOST}:{plain_port}", None, None),
                  Route("TLS front", f"{HOST}:{front_port}", cert_pem, front)]
        if not args.no_direct_tls:
            routes.append(Route("TLS at the backend", f"{HOST}:{secure_port}", cert_pem, None))
        return asyncio.run(run_routes(routes, backend, args))
    finally:
        for proc in (front, backend):
            proc.terminate()
            proc.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unary-calls", type=int, default=2000)
    parser.add_argument("--stream-messages", type=int, default=2000, help="messages in the single stream")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams")
    parser.add_argument("--messages-per-stream", type=int, default=1000, help="of each concurrent stream")
    parser.add_argument("--rounds", type=int, default=7, help="each figure is the median over the rounds")
    parser.add_argument("--no-direct-tls", action="store_true", help="skip the TLS-at-the-backend path")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="grpc-tls-bench-") as folder:
        rounds = measure_all(Path(folder), args)
    results = {name: medians(runs) for name, runs in rounds.items()}
    rows = [[name, f"{r['p50'] * 1e3:.3f}", f"{r['p99'] * 1e3:.3f}", f"{r['one']:,.0f}", f"{r['many']:,.0f}",
             "-" if r["front_cpu"] is None else f"{r['front_cpu']:.0f}", f"{r['back_cpu']:.0f}"]
            for name, r in results.items()]
    table = markdown_table(["path", "unary p50 ms", "unary p99 ms", "1 stream msg/s",
                            f"{args.streams} streams msg/s", "front CPU ms / 1k msgs",
                            "backend CPU ms / 1k msgs"], rows)
    base = results["plaintext"]
    lines = [f"{name} / plaintext: {ratios(base, r)}" for name, r in results.items() if name != "plaintext"]
    print(table)
    print("\n".join(lines))
    if args.record:
        intro = (f"{args.unary_calls} sequential unary calls ({UNARY_TOKENS} tokens in the answer), one stream of "
                 f"{args.stream_messages} messages, {args.streams} concurrent streams of {args.messages_per_stream}; "
                 "one token id and a few characters per message. Backend and front each in their own process; "
                 "CPU columns are per 1,000 messages of the concurrent-stream phase.\n\n")
        record("grpc_tls", "## gRPC TLS front: plaintext vs TLS front vs TLS at the backend\n\n" + intro + table
               + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + analysis(results, rounds, args))


if __name__ == "__main__":
    main()
