"""The async interface: streaming, cancellation by the consumer, failures, and the mock's parity of shape."""

from __future__ import annotations

import asyncio

import pytest
import torch

from r1serve.runtime.engine.async_engine import AsyncEngine, EngineDeadError
from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.mock import MockEngine
from r1serve.runtime.engine.outputs import RequestError
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    return DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, progress=False), Tokenizer.from_dir(
        tiny_checkpoint
    )


@pytest.fixture
def engine(parts):
    model, tokenizer = parts
    engine = AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(num_blocks=128, block_size=8)))
    yield engine
    engine.shutdown()


async def _collect(stream):
    return [out async for out in stream]


def test_concurrent_streams_each_get_their_own_tokens(engine):
    async def main():
        prompts = [[5, 6, 7], list(range(100, 140)), [9]]
        results = await asyncio.gather(*(_collect(engine.generate(f"r{i}", p, GREEDY)) for i, p in enumerate(prompts)))
        alone = [await _collect(engine.generate(f"alone{i}", p, GREEDY)) for i, p in enumerate(prompts)]
        return results, alone

    results, alone = asyncio.run(main())
    for together, single in zip(results, alone):
        assert [t for o in together for t in o.token_ids] == [t for o in single for t in o.token_ids]
        assert together[-1].finished and sum(len(o.token_ids) for o in together) == GREEDY.max_tokens
    assert engine.stats().kv_blocks_used == 0


def test_a_consumer_that_leaves_early_frees_its_blocks(engine):
    async def main():
        stream = engine.generate("r", list(range(60)), SamplingParams(max_tokens=900, temperature=0))
        async for out in stream:
            if out.completion_tokens >= 3:
                break
        await stream.aclose()

    asyncio.run(main())
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0


def test_cancelling_the_task_aborts_the_request(engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=900, temperature=0)):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engine.stats().kv_blocks_used == 0


def test_bad_request_raises_before_anything_is_held(engine):
    async def main():
        await _collect(engine.generate("r", [], GREEDY))

    with pytest.raises(RequestError, match="prompt: is empty"):
        asyncio.run(main())
    assert engine.stats().running == 0


def test_a_failing_step_ends_every_stream_with_an_error(engine, monkeypatch):
    def broken(chunks, **_):
        raise RuntimeError("rank 1 died")

    monkeypatch.setattr(engine.engine.runner, "run", broken)

    async def main():
        return await asyncio.wait_for(_collect(engine.generate("r", [1, 2, 3], GREEDY)), 30)

    [out] = asyncio.run(main())
    assert out.finished and out.finish_reason == "error" and "rank 1 died" in out.error
    assert not engine.healthy

    async def again():
        await _collect(engine.generate("r2", [1], GREEDY))

    with pytest.raises(EngineDeadError):
        asyncio.run(again())


def test_mock_engine_speaks_the_same_interface():
    mock = MockEngine(token_delay_s=0.001)

    async def main():
        outs = await _collect(mock.generate("a", [1, 2], SamplingParams(max_tokens=4)))
        pre = await mock.prefill("b", [1, 2], SamplingParams(max_tokens=4))
        rest = await _collect(mock.generate_from_handoff(pre.handoff))
        return outs, pre, rest

    outs, pre, rest = asyncio.run(main())
    assert [o.token_ids[0] for o in outs] == [MockEngine.token_at([1, 2], i) for i in range(4)]
    assert outs[-1].finish_reason == "length" and pre.handoff.first_token_id == outs[0].token_ids[0]
    assert mock.stats().running == 0 and mock.stats().kv_blocks_used == 0
