"""The stream relay both engine clients use: outputs or an exception from any thread, abort on early exit."""

from __future__ import annotations

import asyncio
import threading

import pytest

from r1serve.runtime.engine.outputs import RequestError, RequestOutput
from r1serve.runtime.engine.stream_relay import StreamRelay


def _out(token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", token_ids=[token], finished=finished, finish_reason="length" if finished else None)


def test_outputs_from_another_thread_arrive_in_order_and_end_at_the_finished_one():
    relay, aborted = StreamRelay(), []

    async def main():
        queue = relay.open("r")
        producer = threading.Thread(target=lambda: [relay.deliver("r", _out(t, t == 3)) for t in (1, 2, 3)])
        producer.start()
        got = [out.token_ids[0] async for out in relay.stream("r", queue, aborted.append)]
        producer.join()
        return got

    assert asyncio.run(main()) == [1, 2, 3]
    assert aborted == [] and relay.open_ids() == []


def test_an_exception_ends_the_stream_and_a_consumer_leaving_early_aborts_once():
    relay, aborted = StreamRelay(), []

    async def abort(request_id):  # an async abort (the expert-parallel group's) is awaited
        aborted.append(request_id)

    async def main():
        failing = relay.open("bad")
        relay.deliver("bad", RequestError("prompt", "is empty"))
        with pytest.raises(RequestError, match="prompt: is empty"):
            [out async for out in relay.stream("bad", failing, abort)]
        queue = relay.open("r")
        with pytest.raises(RequestError, match="'r' is already running"):
            relay.open("r")
        relay.deliver("r", _out(1))
        stream = relay.stream("r", queue, abort)
        assert (await stream.__anext__()).token_ids == [1]
        await stream.aclose()  # the consumer went away

    asyncio.run(main())
    assert aborted == ["r"] and relay.open_ids() == []
    relay.deliver("r", _out(2))  # late outputs for a closed stream are dropped
