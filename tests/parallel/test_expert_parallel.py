"""Expert parallelism over real process groups (gloo on CPU): same outputs as one process, bounded failure."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch
from r1serve_testing.moe_harness import run_moe_layer

from r1serve.runtime.engine.block_manager import prefix_hashes
from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.config import ModelConfig
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.parallel.group import ExpertParallelGroup, GroupFailedError
from r1serve.runtime.serve.router import matched_blocks

pytestmark = pytest.mark.slow

MOE_LAYER = 1
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
ENGINE = EngineConfig(num_blocks=96, block_size=8, max_batch_tokens=64)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("world,redundant", [(2, 0), (2, 2), (3, 2), (4, 0), (4, 4)])
def test_moe_layer_equals_the_single_process_layer(tiny_checkpoint, world, redundant):
    full = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, progress=False)
    torch.manual_seed(world)
    sizes = [37, 0, 5, 64][:world]  # uneven, and one rank with nothing to send
    inputs = [torch.randn(n, full.config.hidden_size) for n in sizes]
    run = run_moe_layer(str(tiny_checkpoint), inputs, layer=MOE_LAYER, redundant=redundant)
    with torch.inference_mode():
        expected = full.model.layers[MOE_LAYER].mlp(torch.cat(inputs))
    got = torch.cat(run.outputs)
    assert got.shape == expected.shape
    assert _rel(got, expected) < 1e-5


def test_expert_memory_per_rank_falls_as_one_over_world_size(tiny_checkpoint):
    hidden = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, progress=False).config.hidden_size
    per_world = {}
    for world in (1, 2, 4):
        run = run_moe_layer(str(tiny_checkpoint), [torch.zeros(1, hidden)] * world, layer=MOE_LAYER)
        per_world[world] = max(run.expert_bytes)
    assert per_world[2] == pytest.approx(per_world[1] / 2, rel=0.05)
    assert per_world[4] == pytest.approx(per_world[1] / 4, rel=0.05)


def _prompts():
    return [list(range(100 + 9 * i, 100 + 9 * i + n)) for i, n in enumerate([5, 40, 12, 1, 26, 60])]


def _single_process(checkpoint, prompts, weights: str = "dequantized") -> dict[str, list[int]]:
    engine = LLMEngine.from_checkpoint(checkpoint, ENGINE, dtype=torch.float64, weights=weights)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    out: dict[str, list[int]] = {}
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return out


def _through_group(group, prompts, prefix="r") -> dict[str, list[int]]:
    async def one(rid, prompt):
        return rid, [t async for o in group.generate(rid, prompt, GREEDY) for t in o.token_ids]

    async def main():
        return dict(await asyncio.gather(*(one(f"{prefix}{i}", p) for i, p in enumerate(prompts))))

    return asyncio.run(main())


@pytest.mark.parametrize("world,redundant", [(2, 0), (3, 2), (4, 4)])
def test_greedy_generation_through_the_group_equals_one_process_before_and_after_rebalance(
    tiny_checkpoint, world, redundant
):
    prompts = _prompts()
    expected = _single_process(tiny_checkpoint, prompts)
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), world, engine=ENGINE, dtype="float64",
                                             redundant=redundant)
    try:
        assert _through_group(group, prompts) == expected
        tokens = sum(len(p) + GREEDY.max_tokens - 1 for p in prompts)  # every token ran every MoE layer once
        top_k = 4
        assert {layer: sum(c) for layer, c in group.expert_load().items()} == {1: tokens * top_k, 2: tokens * top_k}
        before = group.placements()
        assert group.rebalance()  # returns once every rank uses the new placement
        after = group.placements()
        assert after[0] != before[0] and all(p == after[0] for p in after)
        # One rebalance per call: a second over the same decayed window changes nothing.
        assert not group.rebalance() and group.placements() == after
        assert _through_group(group, prompts) == expected  # same prompts, new placement
        stats = group.rank_stats()
        assert all(s.kv_blocks_used == 0 for s in stats)
        assert sum(s.finished for s in stats) == 2 * len(prompts)
    finally:
        group.shutdown()


def test_a_group_of_one_rank_holds_every_expert_and_generates_like_one_process(tiny_checkpoint):
    # What a GPU pool with expertParallel 1 runs: the engine in the rank that holds the GPU, no dispatch.
    prompts = _prompts()
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 1, engine=ENGINE, dtype="float64")
    try:
        expected = _single_process(tiny_checkpoint, prompts)
        assert _through_group(group, prompts) == expected
        assert group.placements() == [{}] and group.expert_load() == {}
        group.rebalance()
        assert list(_through_group(group, prompts, prefix="again").values()) == list(expected.values())
    finally:
        group.shutdown()


def test_a_group_keeps_fp8_weights_and_generates_like_one_process_that_does(tiny_checkpoints):
    checkpoint = tiny_checkpoints["fp8"]
    prompts = _prompts()[:4]
    group = ExpertParallelGroup.in_processes(str(checkpoint), 2, engine=ENGINE, dtype="float64", weights="fp8",
                                             redundant=2)
    try:
        assert group.describe()["weights"] == "fp8"
        expected = _single_process(checkpoint, prompts, weights="fp8")
        assert _through_group(group, prompts) == expected
        assert group.rebalance()  # FP8 experts move with their multipliers
        assert list(_through_group(group, prompts, prefix="again").values()) == list(expected.values())
    finally:
        group.shutdown()


def test_a_group_drafting_with_the_mtp_layer_places_its_experts_and_generates_like_one_process_that_does_not(
        tiny_checkpoint):
    """The MTP layer's routed experts are placed like a MoE layer's: each rank holds its share, drafts reach them
    through the all-to-all (every rank runs the layer once a step, empty where it drafts nothing), their load is
    counted, and a rebalance moves them. Greedy output equals one process without speculation, before and after."""
    prompts = _prompts()[:4]
    world, redundant = 2, 2
    config = ModelConfig.from_file(tiny_checkpoint)
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), world, dtype="float64", redundant=redundant,
                                             engine=EngineConfig(num_blocks=96, block_size=8, max_batch_tokens=64,
                                                                 speculative_tokens=1))
    mtp = config.num_hidden_layers
    try:
        slots = (config.n_routed_experts + redundant) // world
        per_slot = 3 * config.hidden_size * config.moe_intermediate_size * 8  # gate, up and down in float64
        assert group.expert_bytes == [(len(config.moe_layers) + 1) * slots * per_slot] * world
        before = group.placements()[0][mtp]
        expected = _single_process(tiny_checkpoint, prompts)
        assert _through_group(group, prompts) == expected
        stats = group.stats()
        assert stats.draft_tokens > 0 and stats.kv_blocks_used == 0
        assert sum(group.expert_load()[mtp]) > 0
        assert group.rebalance()
        assert group.placements()[0][mtp] != before
        assert list(_through_group(group, prompts, prefix="again").values()) == list(expected.values())
    finally:
        group.shutdown()


def test_a_killed_rank_fails_requests_within_a_bounded_time(tiny_checkpoint):
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE, timeout_s=10)

    async def main():
        outs = []
        started = None
        async for out in group.generate("long", list(range(50)), SamplingParams(max_tokens=600, temperature=0)):
            outs.append(out)
            if started is None:
                started = time.monotonic()
                os.kill(group._transport.procs[1].pid, signal.SIGKILL)
        return outs, time.monotonic() - started

    try:
        outs, elapsed = asyncio.run(asyncio.wait_for(main(), 60))
        assert outs[-1].finished and outs[-1].finish_reason == "error"
        assert "expert-parallel group failed" in outs[-1].error
        assert elapsed < 20
        assert not group.healthy
        with pytest.raises(GroupFailedError):
            asyncio.run(_through_group_once(group))
    finally:
        group.shutdown()


async def _through_group_once(group):
    return [o async for o in group.generate("after", [1, 2], GREEDY)]


def test_the_triton_kernels_run_each_ranks_local_experts_after_the_all_to_all(tiny_checkpoint):
    """Fused MoE behind the expert-parallel dispatcher (interpreted on CPU), in float32, before and after a
    rebalance rewrites the slots in place: the single process's tokens."""
    prompts = _prompts()[:4]
    expected = _single_process(tiny_checkpoint, prompts)
    engine = EngineConfig(num_blocks=96, block_size=8, max_batch_tokens=64, kernels="triton")
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=engine, dtype="float32", redundant=2)
    try:
        assert _through_group(group, prompts) == expected
        group.rebalance()
        assert _through_group(group, prompts, prefix="again") == {f"again{k[1:]}": v for k, v in expected.items()}
    finally:
        group.shutdown()


def test_the_group_publishes_the_prefix_blocks_its_ranks_cache(tiny_checkpoint):
    """An expert-parallel replica tells the prefill router which prompt prefixes it holds: the hashes the
    router computes from a served prompt are among the group's published ones."""
    prompts = _prompts()
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE, timeout_s=30)
    try:
        assert group.cached_prefix_hashes(64) == []
        _through_group(group, prompts)
        published = group.cached_prefix_hashes(256)
        for prompt in prompts:
            router_view = matched_blocks(prefix_hashes(prompt[:-1], ENGINE.block_size), [set(published)])
            assert router_view == (len(prompt) - 1) // ENGINE.block_size, prompt
        assert len(group.cached_prefix_hashes(3)) == 3
    finally:
        group.shutdown()
