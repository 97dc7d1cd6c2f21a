"""Runs one MoE layer across spawned ranks: what tests and benchmarks use to check and time dispatch."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as tmp

from r1serve.runtime.parallel.layout import ExpertParallelLayout, GroupConfig, free_tcp_address, join_group, leave_group


@dataclass(frozen=True)
class LayerRun:
    outputs: list[torch.Tensor]  # per rank, [T_rank, hidden]
    seconds: list[float]  # per rank, mean time of one forward after warm-up
    bytes_moved: list[int]  # per rank, dispatch + combine bytes of one forward
    expert_bytes: list[int]  # per rank, memory held by the layer's routed experts


def run_moe_layer(checkpoint: str, inputs: list[torch.Tensor], *, layer: int, redundant: int = 0,
                  dtype: torch.dtype = torch.float32, repeats: int = 1, timeout_s: float = 60.0) -> LayerRun:
    """Rank r runs `inputs[r]` (its own tokens: attention is data-parallel) through MoE layer `layer`."""
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    address = free_tcp_address()
    world = len(inputs)
    procs = [
        ctx.Process(target=_rank, args=(checkpoint, GroupConfig(world, r, address, timeout_s=timeout_s), inputs[r],
                                        layer, redundant, dtype, repeats, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=timeout_s * 4) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [got[r] for r in range(world) if isinstance(got[r], str)]
    if errors:
        raise RuntimeError("; ".join(errors))
    outputs, seconds, moved, held = (list(x) for x in zip(*(got[r] for r in range(world))))
    return LayerRun([torch.from_numpy(o) for o in outputs], seconds, moved, held)


def _rank(checkpoint, group: GroupConfig, x, layer, redundant, dtype, repeats, results) -> None:
    from r1serve.runtime.model.config import ModelConfig
    from r1serve.runtime.model.model import DeepseekV3ForCausalLM

    torch.set_num_threads(1)
    try:
        join_group(group, "cpu")
        config = ModelConfig.from_file(checkpoint)
        layout = ExpertParallelLayout(config, group.rank, group.world_size, redundant)
        model = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, dtype, experts=layout, progress=False)
        moe = model.model.layers[layer].mlp
        with torch.inference_mode():
            out = moe(x.to(dtype))
            start = time.perf_counter()
            for _ in range(repeats):
                moe(x.to(dtype))
            seconds = (time.perf_counter() - start) / repeats
        bytes_moved = layout.dispatcher(layer).bytes_moved // (repeats + 1)
        expert_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
        # By value: a tensor shared through a file descriptor dies with this process, which exits now.
        results.put((group.rank, (out.numpy(), seconds, bytes_moved, expert_bytes)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        results.put((group.rank, f"rank {group.rank}: {type(exc).__name__}: {exc}"))
    finally:
        leave_group()
