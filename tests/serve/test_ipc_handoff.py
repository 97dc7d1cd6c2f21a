"""cuda-ipc between a prefill and a decode expert-parallel group of Ray rank actors, as a disaggregated deployment
runs them: the prefill rank's engine parks each prompt's latents, only the hand-off with its reference reaches the
decode group, and the decode rank maps the prefill rank's memory (shared host memory here, what a CUDA IPC handle
maps on GPUs), copies it into its paged cache and continues. Greedy tokens equal one engine's, a prompt that
extends a served one copies only what the decode rank's cache lacks, and neither side holds anything after."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.outputs import RemoteLatents
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.group import ExpertParallelGroup
from r1serve.runtime.parallel.transport import IpcLatents

ENGINE = EngineConfig(num_blocks=128, block_size=16, max_running=8)
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [list(range(300 + 7 * i, 300 + 7 * i + n)) for i, n in enumerate([5, 40, 17])]
EXTENDED = PROMPTS[1] + list(range(900, 912))  # its first 32 tokens (two blocks) are in the decode rank's cache


def _group(checkpoint, role: str) -> ExpertParallelGroup:
    return ExpertParallelGroup.on_ray(str(checkpoint), [{"CPU": 0.0}], engine=replace(ENGINE, role=role),
                                      dtype="float32", device="cpu", redundant=0, timeout_s=60,
                                      direct=IpcLatents(20.0))


@pytest.fixture(scope="module")
def groups(cluster, served_checkpoint):
    prefill, decode = _group(served_checkpoint, "prefill"), _group(served_checkpoint, "decode")
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


def _reference(checkpoint, prompts) -> list[list[int]]:
    engine = LLMEngine.from_checkpoint(checkpoint, ENGINE)
    tokens = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"ref-{i}", prompt, GREEDY)
        out = []
        while engine.has_work:
            for step in engine.step():
                out += step.token_ids
        tokens.append(out)
    return tokens


async def _disaggregated(prefill, decode, request_id: str, prompt: list[int]) -> list[int]:
    first = await prefill.prefill(request_id, prompt, GREEDY)
    remote = first.handoff.latents
    assert isinstance(remote, RemoteLatents) and remote.transport == "cuda-ipc"  # still on the prefill rank
    return [t async for out in decode.generate_from_handoff(first.handoff) for t in out.token_ids]


def test_greedy_tokens_through_cuda_ipc_equal_one_engines(groups, served_checkpoint):
    prefill, decode = groups
    prompts = [*PROMPTS, EXTENDED]

    async def main():
        served = await asyncio.gather(*(_disaggregated(prefill, decode, f"ipc-{i}", p)
                                        for i, p in enumerate(PROMPTS)))
        return [*served, await _disaggregated(prefill, decode, "ipc-extended", EXTENDED)]

    assert asyncio.run(main()) == _reference(served_checkpoint, prompts)
    stats = decode.stats()
    assert stats.handoff_tokens_not_sent >= 32  # the extended prompt's cached blocks were not copied again
    deadline = time.monotonic() + 30
    while prefill.stats().handoff_bytes_waiting or decode.stats().kv_blocks_used or prefill.stats().kv_blocks_used:
        assert time.monotonic() < deadline, "latents or blocks still held after every request finished"
        time.sleep(0.1)
