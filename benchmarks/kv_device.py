"""KV hand-off on one machine's device, outside Ray: a prompt's latents from a producer process to a consumer
process, through device IPC (CUDA IPC on a GPU, shared memory on CPU) against a round trip through host memory,
beside the device's own copy bandwidth measured in the same run.

    python benchmarks/kv_device.py [--tokens 512 4096 16384] [--repeats 5] [--json FILE] [--record]
    python benchmarks/kv_device.py --small      # the same code on CPU, small sizes (the suite runs this)

Latents are DeepSeek-V3's: 61 layers x 576 values per token, bfloat16. Each hand-off is a fresh tensor, as a
real one is: the producer makes it on the device and sends it; the consumer copies it into its own buffer on
the device and synchronises. "ipc": what the cuda-ipc connector does (runtime/parallel/kv_ipc.py, its
share_handle and copy_shared): the producer sends a CUDA IPC handle of a few hundred bytes (on CPU, a
shared-memory file's name), and the consumer maps it and copies device to device into a tensor of its own,
then answers (the producer keeps the latents until then, as a prefill rank does until released). "host": the
producer copies it to host memory, it goes through the queue, and the consumer copies it to the device. Each
time runs from the producer starting the hand-off to the consumer having the latents in its buffer
(CLOCK_MONOTONIC is shared by the two processes). "copy": one in-process device-to-device copy of the same
bytes, the ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as tmp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, record  # noqa: E402

from r1serve.runtime.parallel.kv_ipc import copy_shared, share_handle  # noqa: E402

SECTION = "kv-device"
LAYERS, LATENT = 61, 576


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def consumer(device: str, inbox, outbox) -> None:
    """Copies each hand-off onto `device` (a handle: mapped and copied; a host tensor: into a buffer of its own)
    and answers the seconds it took."""
    buffers: dict[tuple, torch.Tensor] = {}
    while True:
        message = inbox.get()
        if message is None:
            return
        latents, started = message
        if isinstance(latents, bytes):
            latents = copy_shared(latents, device)
        else:
            buffer = buffers.setdefault(tuple(latents.shape), torch.empty(latents.shape, dtype=latents.dtype,
                                                                          device=device))
            buffer.copy_(latents)
            _sync(device)
        outbox.put(time.monotonic() - started)
        del latents


def copy_seconds(tokens: int, device: str, repeats: int) -> float:
    src = torch.ones(LAYERS, tokens, LATENT, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def hand_off_seconds(tokens: int, device: str, path: str, repeats: int, inbox, outbox) -> float:
    times = []
    for _ in range(repeats + 1):  # the first warms the path up
        latents = torch.ones(LAYERS, tokens, LATENT, dtype=torch.bfloat16, device=device)
        _sync(device)
        started = time.monotonic()
        inbox.put((share_handle(latents) if path == "ipc" else latents.to("cpu"), started))
        times.append(outbox.get(timeout=600))
        del latents  # the consumer is done with it: it answered
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU, 64 and 256 tokens, 2 repeats")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.device, args.tokens, args.repeats = "cpu", [64, 256], 2

    ctx = tmp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=consumer, args=(args.device, inbox, outbox), daemon=True)
    process.start()
    rows, results = [], []
    try:
        for tokens in args.tokens:
            nbytes = LAYERS * tokens * LATENT * 2
            copy = copy_seconds(tokens, args.device, args.repeats)
            ipc = hand_off_seconds(tokens, args.device, "ipc", args.repeats, inbox, outbox)
            host = hand_off_seconds(tokens, args.device, "host", args.repeats, inbox, outbox)
            result = {"tokens": tokens, "bytes": nbytes, "copy_s": copy, "ipc_s": ipc, "host_s": host}
            results.append(result)
            rows.append([tokens, f"{nbytes / 2**20:.0f}", f"{nbytes / copy / 1e9:.1f}", f"{ipc * 1e3:.2f}",
                         f"{nbytes / ipc / 1e9:.1f}", f"{copy / ipc:.0%}", f"{host * 1e3:.2f}",
                         f"{nbytes / host / 1e9:.2f}", f"{host / ipc:.1f}x"])
            if args.json:  # rewritten after every row: a run cut short still leaves what it finished
                args.json.write_text(json.dumps({"machine": machine(), "device": args.device, "rows": results},
                                                indent=2))
    finally:
        inbox.put(None)
        process.join(30)
    headers = ["prompt tokens", "latents MiB", "copy GB/s (ceiling)", "ipc ms", "ipc GB/s", "ipc / copy",
               "host ms", "host GB/s", "ipc speed-up"]
    table = markdown_table(headers, rows)
    print(table)
    if args.record:
        ipc = "CUDA IPC" if args.device.startswith("cuda") else "shared memory"
        record(SECTION, f"## KV hand-off on one {args.device} device: {ipc} vs host round trip, outside Ray\n\n"
               + table + "\n\nMedian of the repeats after a warm-up, each a fresh tensor, from the producer "
               "starting the hand-off to the latents in the consumer's own buffer on the device. "
               "\"ipc / copy\" is the share of an in-process device copy of the same bytes, measured in the "
               "same run.")


if __name__ == "__main__":
    main()
