"""Per-request output streams between a thread that produces outputs and the asyncio tasks that consume them.

Both engine clients use it: the in-process engine (its stepping thread) and the expert-parallel group (its
relay thread). Outputs or exceptions may be delivered from any thread; a stream ends at its finished
output or at the first exception, which it raises; a consumer that leaves early aborts its request.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .outputs import RequestError, RequestOutput


class StreamRelay:
    def __init__(self):
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

    def open(self, request_id: str) -> asyncio.Queue:
        """Register a stream for the calling event loop; a request id can be open only once."""
        with self._lock:
            if request_id in self._streams:
                raise RequestError("request_id", f"{request_id!r} is already running")
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def open_ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Hand an output (or the exception that ends the stream) to its consumer; thread-safe."""
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    async def stream(self, request_id: str, queue: asyncio.Queue,
                     abort: Callable[[str], Any]) -> AsyncIterator[RequestOutput]:
        """The request's outputs up to its finished one. Leaving early (a cancelled or disconnected
        consumer) calls `abort(request_id)`, so the engine frees the request at once."""
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the producer ended it: nothing to abort
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                result = abort(request_id)
                if inspect.isawaitable(result):
                    await result
            self.close(request_id)
