"""KV hand-off benchmark: a prompt's latents from a prefill-like actor to a decode-like actor, per connector.

    python benchmarks/kv_handoff.py [--tokens 512 4096 16384] [--repeats 3] [--record]
    python benchmarks/kv_handoff.py --small     # 64 tokens, one repeat (the suite runs this)

Latents are DeepSeek-V3's: 61 layers x 576 values (kv_lora_rank 512 + rope 64) per token, bfloat16. As in the
served graph, only a reference passes through a third actor (the replicas and the Ingress) between the two
ranks. object-store: the prefill side puts the latents into Ray's object store and the decode side gets them.
nixl: the prefill side parks them in its Ray Direct Transport store and the decode side reads them one-sided
(runtime/parallel/transport.py, DirectLatents). gloo: the prefill side parks them under a key, and the decode
side asks for the key and receives them over its two-member gloo link to the prefill side (GlooLatents; the link
is made once, in the warm-up). cuda-ipc: the prefill side parks them, and the decode side asks it to share them,
maps the memory and copies it (IpcLatents): on CPU the handle names a shared-memory file, and parking
moves the latents into it (one copy a GPU rank does not make), where on a GPU it is a CUDA IPC handle
(benchmarks/kv_device.py measures that one). Latency runs from the hand-off's start on the prefill side to the
latents being in the decode side's memory. The ceiling is a copy of the same bytes within one process, measured
in the same run (memory bandwidth, not a network).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

SECTION = "kv-handoff"
LAYERS, LATENT = 61, 576


def latents(tokens: int) -> torch.Tensor:
    return torch.ones(LAYERS, tokens, LATENT, dtype=torch.bfloat16)


CONNECTORS = ("object-store", "nixl", "gloo", "cuda-ipc")


def _stores() -> dict:
    from r1serve.runtime.parallel.transport import direct_latents

    return {name: direct_latents(name, 120.0) for name in CONNECTORS[1:]}


class Prefill:
    def __init__(self):
        self.direct = _stores()

    def hand_off(self, tokens: int, connector: str) -> tuple[list, float]:
        import ray

        start = time.time()
        x = latents(tokens)
        ref = self.direct[connector].park(x) if connector in self.direct else ray.put(x)
        return [ref], start

    # Called by the decode side for gloo, as transport._RankActor's are.
    def kv_join(self, link: str, address: str) -> None:
        self.direct["gloo"].join(link, address)

    def kv_offer(self, link: str, key: str, start: int = 0) -> str:
        return self.direct["gloo"].offer(link, key, start)

    # Called by the decode side for cuda-ipc.
    def kv_share(self, key: str, start: int = 0) -> bytes | None:
        return self.direct["cuda-ipc"].share(key, start)

    def kv_release(self, key: str) -> None:
        self.direct["cuda-ipc"].release(key)


class Relay:
    def forward(self, box):
        return box


class Decode:
    def __init__(self):
        self.direct = _stores()

    def receive(self, box, start: float) -> float:
        import ray

        from r1serve.runtime.engine.outputs import KVHandoff, RemoteLatents
        from r1serve.runtime.engine.sampling import SamplingParams

        item = box[0]
        if isinstance(item, RemoteLatents):
            handoff = KVHandoff("bench", [0] * item.shape[1], 0, SamplingParams(), item)
            x = self.direct[item.transport].pull(handoff).latents
        else:
            x = ray.get(item, timeout=120)
        assert x.shape[0] == LAYERS
        return time.time() - start


def copy_seconds(tokens: int, repeats: int) -> float:
    x = latents(tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.clone()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--small", action="store_true", help="64 tokens, one repeat")
    args = parser.parse_args()
    if args.small:
        args.tokens, args.repeats = [64], 1

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    from r1serve.runtime.parallel.transport import KV_GROUP

    remote = ray.remote(num_cpus=0, enable_tensor_transport=True, concurrency_groups={KV_GROUP: 4})
    prefill, decode = remote(Prefill).remote(), remote(Decode).remote()
    relay = ray.remote(num_cpus=0)(Relay).remote()
    rows, ratios = [], []
    for tokens in args.tokens:
        nbytes = LAYERS * tokens * LATENT * 2
        ceiling = copy_seconds(tokens, args.repeats)
        row = [tokens, f"{nbytes / 2**20:.0f}", f"{nbytes / ceiling / 1e9:.1f}"]
        times = {}
        for connector in CONNECTORS:
            seconds = []
            for _ in range(args.repeats + 1):  # the first warms up the transport
                box, start = ray.get(prefill.hand_off.remote(tokens, connector))
                box = ray.get(relay.forward.remote(box))
                seconds.append(ray.get(decode.receive.remote(box, start)))
                del box
            best = times[connector] = statistics.median(seconds[1:])
            row += [f"{best * 1e3:.1f}", f"{nbytes / best / 1e9:.2f}"]
        rows.append(row)
        # Each connector against the object store (the baseline) and against the copy ceiling, same run.
        ratios.append([tokens, *(f"{times[CONNECTORS[0]] / times[c]:.1f}x / {ceiling / times[c]:.0%}"
                                 for c in CONNECTORS[1:])])
    ray.shutdown()
    headers = ["prompt tokens", "latents MiB", "copy GB/s (ceiling)", "object-store ms", "object-store GB/s",
               "nixl ms", "nixl GB/s", "gloo ms", "gloo GB/s", "cuda-ipc (shared memory) ms",
               "cuda-ipc (shared memory) GB/s"]
    table = markdown_table(headers, rows) + "\n\n" + markdown_table(
        ["prompt tokens", *(f"{c}: speed-up vs object-store / share of copy ceiling" for c in CONNECTORS[1:])],
        ratios)
    print(table)
    if args.record:
        record(SECTION, "## KV hand-off: object store vs rank to rank (NIXL, gloo, cuda-ipc's code path over "
               "shared memory), on CPU\n\n" + table + "\n\n"
               "Latency is the median of the repeats after a warm-up, from the hand-off's start on the prefill "
               "side to the latents in the decode side's memory, with the reference passed through a third "
               "actor. Both sides share one machine's memory here. cuda-ipc is a GPU connector; on CPU its "
               "code path maps shared memory instead, and parking first copies the latents into a fresh "
               "shared-memory file (a GPU rank shares its latents where they are), so this column times "
               "the connector's calls, not CUDA IPC: benchmarks/kv_device.py measures that on a GPU. The "
               "GPU transports are measured only on a machine with GPUs.")


if __name__ == "__main__":
    main()
