"""Engine throughput and per-token latency against transformers' generate, measured in the same run.

    python benchmarks/engine.py [--concurrency 1 8 32 64] [--record]

Workload: prompts of 16-128 tokens and outputs of 16-96 tokens (seeded), greedy, end-of-sequence ignored,
served closed-loop at a fixed concurrency C: C requests are in flight, and each one that finishes is
replaced by the next, for 3*C requests in all (at least 16).
Baselines on the same tiny checkpoint and dtype, same requests: transformers one request at a time (its
rate does not depend on C, so it is measured once), and transformers serving the requests in padded
batches of C (each batch runs until its longest request is done; only requested tokens count).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from r1serve.runtime.engine.sampling import SamplingParams  # noqa: E402
from r1serve.runtime.model.tiny import make_tiny  # noqa: E402


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1000, 100000) for _ in range(rng.randint(16, 128))], rng.randint(16, 96)) for _ in range(n)]


def run_engine(engine: LLMEngine, requests, concurrency: int) -> dict:
    """Closed loop: keep `concurrency` requests in flight until all are done."""
    start = time.perf_counter()
    submitted, first, last, count = {}, {}, {}, {}
    pending = list(enumerate(requests))
    while pending or engine.has_work:
        while pending and len(submitted) - len(last.keys() & _done(count, requests)) < concurrency:
            i, (prompt, n) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            submitted[f"r{i}"] = time.perf_counter()
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            count[out.request_id] = out.completion_tokens
    wall = time.perf_counter() - start
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in count if count[r] > 1]
    return {"tokens": sum(count.values()), "wall": wall,
            "ttft": statistics.mean(first[r] - submitted[r] for r in first), "tpot": statistics.mean(tpot)}


def _done(count: dict, requests) -> set:
    return {r for r, c in count.items() if c == requests[int(r[1:])][1]}


def run_hf_one_at_a_time(model, requests) -> dict:
    tokens, start, tpots = 0, time.perf_counter(), []
    for prompt, n in requests:
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        tokens += out.shape[1] - len(prompt)
        tpots.append((time.perf_counter() - t0) / n)
    return {"tokens": tokens, "wall": time.perf_counter() - start, "tpot": statistics.mean(tpots)}


def run_hf_padded(model, requests, concurrency: int) -> dict:
    tokens, wall, tpots = 0, 0.0, []
    for start in range(0, len(requests), concurrency):
        batch = _padded_batch(model, requests[start : start + concurrency])
        tokens, wall = tokens + batch["tokens"], wall + batch["wall"]
        tpots.append(batch["tpot"])
    return {"tokens": tokens, "wall": wall, "tpot": statistics.mean(tpots)}


def _padded_batch(model, requests) -> dict:
    width = max(len(p) for p, _ in requests)
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(requests):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    longest = max(n for _, n in requests)
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                   eos_token_id=None, pad_token_id=0)
    wall = time.perf_counter() - start
    return {"tokens": sum(n for _, n in requests), "wall": wall, "tpot": wall / longest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--baseline-requests", type=int, default=12, help="requests for the one-at-a-time rate")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    from transformers import DeepseekV3ForCausalLM

    checkpoint = make_tiny(Path(tempfile.mkdtemp()) / "tiny")
    engine = LLMEngine.from_checkpoint(checkpoint, EngineConfig(num_blocks=2048, block_size=16, max_running=64))
    hf = DeepseekV3ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    run_engine(engine, workload(4, seed=99), 4)  # warm up both
    run_hf_padded(hf, workload(2, seed=99), 2)
    single = run_hf_one_at_a_time(hf, workload(args.baseline_requests, seed=1))
    single_rate = single["tokens"] / single["wall"]
    rows = []
    for c in args.concurrency:
        requests = workload(max(3 * c, 16), seed=c)
        ours = run_engine(engine, requests, c)
        padded = run_hf_padded(hf, requests, c)
        rate, padded_rate = ours["tokens"] / ours["wall"], padded["tokens"] / padded["wall"]
        rows.append([c, f"{rate:.0f}", f"{ours['tpot'] * 1e3:.1f}", f"{ours['ttft'] * 1e3:.0f}",
                     f"{single_rate:.0f}", f"{padded_rate:.0f}", f"{padded['tpot'] * 1e3:.1f}",
                     f"{rate / single_rate:.1f}x", f"{rate / padded_rate:.2f}x"])
        print(f"concurrency {c}: engine {rate:.0f} tok/s, padded batch {padded_rate:.0f} tok/s", flush=True)
    headers = ["concurrent", "engine tok/s", "engine TPOT ms", "engine mean TTFT ms", "HF 1-by-1 tok/s",
               "HF padded tok/s", "HF padded TPOT ms", "vs 1-by-1", "vs padded"]
    table = markdown_table(headers, rows)
    print(table)
    if args.record:
        record("engine", "## Engine: continuous batching vs transformers generate\n\n" + table)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
