"""Runs an LLMEngine's steps on a background thread and serves each request as an async stream."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from .engine import LLMEngine
from .interface import last_output
from .outputs import EngineStats, EngineUnavailableError, KVHandoff, RequestOutput
from .sampling import SamplingParams
from .stream_relay import StreamRelay

log = logging.getLogger(__name__)


class EngineDeadError(EngineUnavailableError):
    """The engine's step failed; every request it held has ended with an error."""


class AsyncEngine:
    """The EngineClient over a real engine. One thread steps the model whenever there is work; requests
    arrive from any event loop and get their outputs through per-request queues."""

    def __init__(self, engine: LLMEngine, *, idle_wait_s: float = 0.05):
        self.engine = engine
        self._lock = threading.Lock()  # the engine is single-threaded: every call holds this
        self._wakeup = threading.Event()
        self._relay = StreamRelay()
        self._idle_wait_s = idle_wait_s
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="r1serve-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    def describe(self) -> dict[str, str]:
        return self.engine.describe()

    def cached_prefix_hashes(self, limit: int) -> list[int]:
        with self._lock:
            return self.engine.cached_prefix_hashes(limit)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       resumed: tuple[int, ...] = ()) -> AsyncIterator[RequestOutput]:
        queue = self._open(request_id, lambda: self.engine.add_request(request_id, prompt_token_ids, params, resumed))
        async for out in self._relay.stream(request_id, queue, self.abort):
            yield out

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      resumed: tuple[int, ...] = ()) -> RequestOutput:
        return await last_output(self.generate(request_id, prompt_token_ids, params, resumed))

    async def generate_from_handoff(self, handoff: KVHandoff) -> AsyncIterator[RequestOutput]:
        queue = self._open(handoff.request_id, lambda: self.engine.add_handoff(handoff))
        async for out in self._relay.stream(handoff.request_id, queue, self.abort):
            yield out

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # -- internals ---------------------------------------------------------------------------------

    def _open(self, request_id: str, submit) -> asyncio.Queue:
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        queue = self._relay.open(request_id)
        try:
            with self._lock:
                immediate = submit()  # raises RequestError for a bad request
        except BaseException:
            self._relay.close(request_id)
            raise
        for out in immediate or ():
            queue.put_nowait(out)
        self._wakeup.set()
        return queue

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_work
                outputs = self._step() if busy else []
            self._deliver(outputs)
            if not busy:
                self._wakeup.wait(self._idle_wait_s)
                self._wakeup.clear()

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - any failure must end the requests, not hang them
            log.exception("engine step failed; ending all requests")
            self.error = exc
            self._stopping = True
            return self.engine.fail_all(f"engine failure: {exc}")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._relay.deliver(out.request_id, out)
