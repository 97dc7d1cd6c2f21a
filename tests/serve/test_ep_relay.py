"""A Ray expert-parallel group's outputs reach its controller straight from the ranks, and give exactly what
the shared-queue relay (the simple path, kept as the reference) gives."""

from __future__ import annotations

import asyncio
import time

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


class _Probed:
    """Stands in for a rank actor: answers its liveness probe after `after_s`."""

    def __init__(self, after_s: float):
        self.after_s = after_s

    def alive(self) -> bool:
        time.sleep(self.after_s)
        return True


def test_a_rank_slow_to_answer_is_not_taken_for_dead_before_the_groups_timeout(cluster):
    """On a loaded machine a rank may answer late; only one silent for longer than the group's timeout is
    stuck, and one whose actor died is gone. Asking never waits on a probe (the relay asks between outputs)."""
    import ray

    probed = ray.remote(num_cpus=0)(_Probed)
    slow, stuck, killed = probed.remote(3.0), probed.remote(3600.0), probed.remote(0.0)
    transport = RayTransport([], [], unanswered_s=6.0)
    transport.actors, transport.world_size = [slow, stuck, killed], 3
    ray.get(killed.alive.remote())
    ray.kill(killed, no_restart=True)
    deadline, seen = time.monotonic() + 60, {}
    while not {1, 2} <= seen.keys():
        assert time.monotonic() < deadline, f"the stuck and the killed rank were not found: {seen}"
        seen = transport.dead_ranks()
        assert 0 not in seen, seen
        time.sleep(0.2)
    for _ in range(20):  # the slow rank keeps answering within the timeout
        assert 0 not in transport.dead_ranks()
        time.sleep(0.2)
    assert seen[1] == "rank 1 did not answer for 6s"
    assert seen[2].startswith("rank 2 is gone (")
    for actor in (slow, stuck):
        ray.kill(actor, no_restart=True)
