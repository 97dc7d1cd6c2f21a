"""The engine's fast paths against its torch path: the Triton kernels (interpreted on CPU) and decode steps
run through the static buffers that CUDA graphs replay, token for token in float32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine, runner_paths
from r1serve.runtime.engine.model_runner import ModelRunner, RunnerPaths

from .workload import GREEDY
from .workload import drain as _drain
from .workload import prompts as _prompts
from .workload import tokens as _tokens

CONFIG = EngineConfig(num_blocks=30, block_size=8, max_batch_tokens=48, max_running=6, max_model_len=160)


def _serve(engine: LLMEngine) -> tuple[list[list[int]], LLMEngine]:
    """Requests joining while others run, in a cache too small for all (preemptions, shared prefixes)."""
    prompts, outputs = _prompts(), {}
    for i, p in enumerate(prompts[:5]):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(4):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for i, p in enumerate(prompts[5:], start=5):
        engine.add_request(f"r{i}", p, GREEDY)
    _drain(engine, outputs)
    return [_tokens(outputs[f"r{i}"]) for i in range(len(prompts))], engine


# Every engine sets the model's kernels from its paths, so the shared model needs no resetting. (The
# kernels alone, without static buffers, are covered by the greedy parity test in tests/model.)
PATHS = {
    "torch, static decode buffers": (RunnerPaths(kernels="torch", static_decode=True), False),
    "triton kernels, static decode buffers": (RunnerPaths(kernels="triton", static_decode=True), False),
    # What a CUDA engine runs: graphs' static buffers fed from the previous step's tokens on the device.
    "triton kernels, static decode buffers, overlapped": (RunnerPaths(kernels="triton", static_decode=True), True),
}


@pytest.mark.parametrize("name", PATHS)
def test_fast_paths_give_the_torch_paths_tokens(model32, tokenizer, expected, name):
    paths, overlap = PATHS[name]
    eager, _ = _serve(LLMEngine(model32, tokenizer, CONFIG, paths=RunnerPaths(kernels="torch")))
    fast, engine = _serve(LLMEngine(model32, tokenizer, replace(CONFIG, overlap=overlap), paths=paths))
    assert fast == eager
    assert fast == expected  # and float32 keeps the float64 reference's greedy choices
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_hit_tokens > 0 and stats.kv_blocks_used == 0
    assert not engine.runner.tables._rows, "every finished sequence gave its block-table row back"


def test_padding_rows_write_and_read_only_the_scratch_block(model32):
    """A bucket's padding rows touch only the extra cache block the scheduler never hands out."""
    runner = ModelRunner(model32, num_blocks=8, block_size=8, max_running=4, max_model_len=64,
                         paths=RunnerPaths(kernels="torch", static_decode=True))
    graphs = runner.graphs
    assert graphs.buckets == [1, 2, 4] and runner.scratch_block == 8
    for cache in runner.caches:
        cache[: 8 * 8] = 1.0  # the 8 blocks the scheduler hands out
    before = [c.clone() for c in runner.caches]
    model32(graphs.static_batch(4), runner.caches)  # all four rows are padding
    for old, new in zip(before, runner.caches):
        assert torch.equal(old[: 8 * 8], new[: 8 * 8]) and not torch.equal(old[8 * 8:], new[8 * 8:])


def test_auto_picks_the_torch_path_on_cpu_and_graphs_only_on_cuda():
    paths = runner_paths(EngineConfig(), torch.device("cpu"))
    assert paths == RunnerPaths(kernels="torch", cuda_graphs=False)
    with pytest.raises(ValueError, match="kernels: must be one of auto, torch, triton"):
        EngineConfig(kernels="cuda")
