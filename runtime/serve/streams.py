"""Adaptive coalescing of output streams: one message per hop per wake-up, not one per token.

Every message through a Serve handle or proxy costs a fixed amount of CPU. A consumer that keeps up
gets every output as it comes (no added latency); one that falls behind gets the backlog merged into
one message, so the serving layer's cost stops growing with the token rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


async def coalesced(source: AsyncIterator[T], merge: Callable[[list[T]], T],
                    min_interval: Callable[[], float] = lambda: 0.0) -> AsyncIterator[T]:
    """Items of `source`, those that piled up while the consumer was away merged with `merge`.

    At least `min_interval()` seconds separate two messages after the first (0: as fast as they are
    consumed); the end of the stream is never held back. Closing or cancelling the consumer cancels the
    reading task, which closes `source` mid-await.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put_nowait(_Failure(exc))
            return
        queue.put_nowait(_END)

    loop = asyncio.get_running_loop()
    task = loop.create_task(pump())
    last = None
    try:
        while True:
            batch = [await queue.get()]
            wait = last + min_interval() - loop.time() if last is not None else 0.0
            if wait > 0 and batch[0] is not _END and not isinstance(batch[0], _Failure):
                await asyncio.sleep(wait)  # what arrives meanwhile joins this message
            while not queue.empty():
                batch.append(queue.get_nowait())
            items = [b for b in batch if b is not _END and not isinstance(b, _Failure)]
            if items:
                last = loop.time()
                yield merge(items)
            tail = batch[-1]
            if isinstance(tail, _Failure):
                raise tail.exc
            if tail is _END:
                return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


