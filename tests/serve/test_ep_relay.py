"""A Ray expert-parallel group's outputs reach its controller straight from the ranks, and give exactly what
the shared-queue relay (the simple path, kept as the reference) gives."""

from __future__ import annotations

import asyncio

import pytest

from r1serve.runtime.engine.engine import EngineConfig
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.group import ExpertParallelGroup, rank_specs
from r1serve.runtime.parallel.transport import RayTransport, rank0_address

ENGINE = EngineConfig(num_blocks=128, block_size=16, max_running=8)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [list(range(200 + 11 * i, 200 + 11 * i + n)) for i, n in enumerate([3, 20, 9])]


def _streams(checkpoint, relay: str) -> list[list[list[int]]]:
    specs = rank_specs(str(checkpoint), 2, engine=ENGINE, dtype="float32", device="cpu", redundant=0,
                       timeout_s=60, address=rank0_address(None, 60))
    group = ExpertParallelGroup(RayTransport(specs, [{"CPU": 0.0}] * 2, relay=relay))

    async def one(i, prompt):
        return [out.token_ids async for out in group.generate(f"{relay}-{i}", prompt, GREEDY)]

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        return asyncio.run(main())
    finally:
        group.shutdown()


def test_outputs_straight_from_the_ranks_equal_the_shared_queues(cluster, served_checkpoint):
    direct = _streams(served_checkpoint, "direct")
    assert [sum(len(t) for t in stream) for stream in direct] == [GREEDY.max_tokens] * len(PROMPTS)
    assert [[t for out in s for t in out] for s in direct] == \
        [[t for out in s for t in out] for s in _streams(served_checkpoint, "queue")]


def test_an_unknown_relay_is_refused():
    with pytest.raises(ValueError, match="relay: must be one of direct, queue"):
        RayTransport([], [], relay="pigeon")
