"""MoE layer time: grouped expert execution against a per-expert loop, and expert parallelism's traffic.

    python benchmarks/moe.py [--tokens 256 2048] [--ranks 2 4] [--record]

The layer: 64 routed experts of 512x256 (top-8 of 8 groups, 4 groups kept), one shared expert, hidden
512, in float32. "per-expert loop" runs each expert's tokens as its own pair of matmuls (as simple MoE
code does); "grouped" runs all experts as two batched matmuls over tokens sorted by expert. The
expert-parallel rows run the same layer over N gloo ranks (CPU), each rank holding 1/N of the experts
and routing its own share of the tokens: per-step time is the slowest rank's, bytes are what dispatch
and combine send per step in total. On CUDA the same script reports the fraction of memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

from r1serve.runtime.model.model import DeepseekV3ForCausalLM  # noqa: E402
from r1serve.runtime.model.tiny import make_tiny  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test-support package
from r1serve_testing.moe_harness import run_moe_layer  # noqa: E402

LAYER = 1
CONFIG = {"vocab_size": 1024, "hidden_size": 512, "moe_intermediate_size": 256, "intermediate_size": 1024,
          "n_routed_experts": 64, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
          "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}


def time_it(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def local_rows(model, tokens: int, repeats: int, device: str) -> list[list]:
    moe = model.model.layers[LAYER].mlp
    x = torch.randn(tokens, model.config.hidden_size, device=device)
    weights, ids = moe.gate(x)
    k = ids.shape[1]
    slots = moe.experts.slot_of[ids.reshape(-1)]
    copies = x.repeat_interleave(k, dim=0)
    expert_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, fn in (("per-expert loop", moe.experts.forward_per_expert), ("grouped", moe.experts.forward)):
        seconds = time_it(lambda: (fn(copies, slots), sync()), repeats)
        bandwidth = ""
        if device == "cuda":
            peak = _peak_bandwidth()
            bandwidth = f"{expert_bytes / seconds / peak:.0%}" if peak else ""
        rows.append([f"local ({device})", tokens, name, f"{seconds * 1e3:.2f}", f"{tokens / seconds:,.0f}", "-",
                     bandwidth])
    return rows


def _peak_bandwidth() -> float | None:
    """Bytes/s of the device's memory, from its clock and bus width where torch reports them."""
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock * 1e3 * width / 8 if clock and width else None


def parallel_rows(checkpoint: str, hidden: int, tokens: int, ranks: int, repeats: int) -> list:
    inputs = [torch.randn(tokens // ranks, hidden) for _ in range(ranks)]
    run = run_moe_layer(checkpoint, inputs, layer=LAYER, repeats=repeats)
    slowest = max(run.seconds)
    return [f"expert-parallel x{ranks} (gloo)", tokens, "grouped + all-to-all", f"{slowest * 1e3:.2f}",
            f"{tokens / slowest:,.0f}", f"{sum(run.bytes_moved) / 1e6:.2f} MB", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    checkpoint = str(make_tiny(Path(tempfile.mkdtemp()) / "moe", overrides=CONFIG, seed=1))
    model = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float32, progress=False)
    rows = []
    for tokens in args.tokens:
        rows += local_rows(model, tokens, args.repeats, "cpu")
        if torch.cuda.is_available():
            rows += local_rows(model.to("cuda"), tokens, args.repeats, "cuda")
            model.to("cpu")
        for ranks in args.ranks:
            rows.append(parallel_rows(checkpoint, model.config.hidden_size, tokens, ranks, args.repeats))
    speedups = []
    for tokens in args.tokens:
        loop, grouped = (float(r[3]) for r in rows if r[1] == tokens and r[0] == "local (cpu)")
        speedups.append(f"{tokens} tokens: grouped is {loop / grouped:.1f}x the per-expert loop")
    table = markdown_table(["where", "tokens", "experts run as", "ms / step", "tokens/s", "dispatch+combine",
                            "of memory bandwidth"], rows)
    print(table)
    print("\n".join(speedups))
    if args.record:
        record("moe", "## MoE layer: grouped experts, per-expert loop, expert parallelism\n\n" + table + "\n\n"
               + "\n".join(f"- {s}" for s in speedups))


if __name__ == "__main__":
    main()
