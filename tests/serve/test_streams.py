"""Coalescing of output streams: nothing lost or reordered, backlogs merged, failures and cancellation
reach the source."""

from __future__ import annotations

import asyncio

import pytest

from r1serve.runtime.engine.outputs import RequestOutput
from r1serve.runtime.serve.messages import from_wire, merge_outputs, to_wire
from r1serve.runtime.serve.streams import coalesced


def outputs(n: int) -> list[RequestOutput]:
    return [RequestOutput("r", [i], text=f"t{i}", content=f"t{i}", finished=i == n - 1, completion_tokens=i + 1,
                          finish_reason="length" if i == n - 1 else None) for i in range(n)]


async def source(items, delay: float = 0.0, fail: Exception | None = None, closed: list | None = None):
    try:
        for item in items:
            if delay:
                await asyncio.sleep(delay)
            yield item
        if fail is not None:
            raise fail
    finally:
        if closed is not None:
            closed.append(True)


def test_a_slow_consumer_gets_the_backlog_merged_in_order():
    async def run():
        got = []
        async for out in coalesced(source(outputs(20)), merge_outputs):
            got.append(out)
            await asyncio.sleep(0.01)  # the producer runs ahead meanwhile
        return got

    got = asyncio.run(run())
    assert len(got) < 20
    merged = merge_outputs(got)
    assert merged.token_ids == list(range(20)) and merged.text == "".join(f"t{i}" for i in range(20))
    assert merged.finished and merged.finish_reason == "length" and merged.completion_tokens == 20


def test_min_interval_spaces_messages_but_never_holds_the_end():
    async def run():
        loop, times = asyncio.get_running_loop(), []
        async for out in coalesced(source(outputs(10), delay=0.01), merge_outputs, lambda: 0.05):
            times.append((loop.time(), out))
        return times

    times = asyncio.run(run())
    gaps = [b[0] - a[0] for a, b in zip(times, times[1:-1])]
    assert all(gap >= 0.045 for gap in gaps) and len(times) < 10
    assert merge_outputs([out for _, out in times]).token_ids == list(range(10))


def test_a_failure_reaches_the_consumer_after_what_came_before():
    async def run():
        got = []
        with pytest.raises(RuntimeError, match="boom"):
            async for out in coalesced(source(outputs(3), fail=RuntimeError("boom")), merge_outputs):
                got.append(out)
        return got

    assert merge_outputs(asyncio.run(run())).token_ids == [0, 1, 2]


def test_closing_the_consumer_closes_the_source():
    async def run():
        closed = []
        stream = coalesced(source(outputs(100), delay=0.01, closed=closed), merge_outputs)
        await anext(stream)
        await stream.aclose()
        return closed

    assert asyncio.run(run()) == [True]


def test_outputs_survive_the_wire_form():
    out = outputs(2)[1]
    assert from_wire(to_wire(out)) == out
