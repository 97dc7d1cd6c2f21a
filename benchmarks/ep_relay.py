"""How a Ray expert-parallel group's token streams reach its controller: straight from each rank (a long
poll per rank) against one shared Ray queue actor that every rank puts into.

    python benchmarks/ep_relay.py [--ranks 2] [--requests 16] [--tokens 64] [--repeats 2] [--record]

A group of `--ranks` CPU ranks (gloo) on a local Ray runs the tiny random checkpoint; `--requests` greedy
requests of `--tokens` tokens each start at once and stream to the end. Reported per relay: wall time,
streamed outputs per second at the controller, and the median gap between consecutive outputs of one
request as the controller sees them. Both relays run in the same Ray session, alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

from r1serve.runtime.engine.engine import EngineConfig  # noqa: E402
from r1serve.runtime.engine.sampling import SamplingParams  # noqa: E402
from r1serve.runtime.model.tiny import make_tiny  # noqa: E402
from r1serve.runtime.parallel.group import ExpertParallelGroup, rank_specs  # noqa: E402
from r1serve.runtime.parallel.transport import RayTransport, rank0_address  # noqa: E402

SECTION = "ep-relay"
ENGINE = EngineConfig(num_blocks=512, block_size=16, max_running=64)


async def stream_all(group, requests: int, tokens: int, tag: str) -> tuple[int, list[float]]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    gaps: list[float] = []

    async def one(i: int) -> int:
        last, count = None, 0
        async for _ in group.generate(f"{tag}-{i}", list(range(100 + i, 140 + i)), params):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last, count = now, count + 1
        return count

    counts = await asyncio.gather(*(one(i) for i in range(requests)))
    return sum(counts), gaps


def run(checkpoint: str, relay: str, ranks: int, requests: int, tokens: int, tag: str) -> tuple[float, int, float]:
    specs = rank_specs(checkpoint, ranks, engine=ENGINE, dtype="float32", device="cpu", redundant=0,
                       timeout_s=60, address=rank0_address(None, 60))
    bundles = [{"CPU": 0.5}] * ranks
    group = ExpertParallelGroup(RayTransport(specs, bundles, relay=relay))
    try:
        asyncio.run(stream_all(group, 2, 4, f"{tag}-warm"))
        start = time.perf_counter()
        outputs, gaps = asyncio.run(stream_all(group, requests, tokens, tag))
        return time.perf_counter() - start, outputs, statistics.median(gaps)
    finally:
        group.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[tuple[float, int, float]]] = {relay: [] for relay in RayTransport.RELAYS}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(make_tiny(Path(tmp) / "tiny", seed=3))
        for repeat in range(args.repeats):
            for relay in ("queue", "direct"):
                results[relay].append(run(checkpoint, relay, args.ranks, args.requests, args.tokens,
                                          f"{relay}{repeat}"))
    ray.shutdown()
    rows = []
    for relay in ("queue", "direct"):
        wall = statistics.median(r[0] for r in results[relay])
        outputs = results[relay][0][1]
        gap = statistics.median(r[2] for r in results[relay])
        rows.append([relay, f"{wall:.2f}", outputs, f"{outputs / wall:.0f}", f"{gap * 1e3:.1f}"])
    ratio = statistics.median(r[0] for r in results["queue"]) / statistics.median(r[0] for r in results["direct"])
    table = markdown_table(["relay", "wall s", "outputs", "outputs/s", "median gap ms"], rows)
    print(table)
    print(f"direct vs queue: {ratio:.2f}x the throughput")
    if args.record:
        record(SECTION, "## Expert-parallel token streams: straight from the ranks vs one shared queue actor\n\n"
               f"{args.ranks} CPU ranks, {args.requests} greedy requests of {args.tokens} tokens at once, the "
               "tiny random checkpoint; median of the repeats.\n\n" + table +
               f"\n\nStraight from the ranks: {ratio:.2f}x the throughput of the shared queue.")


if __name__ == "__main__":
    main()
