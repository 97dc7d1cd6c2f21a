"""The one interface every layer above the engine uses (Serve deployments, the RPC layer, tests)."""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from .outputs import EngineStats, KVHandoff, RequestOutput
from .sampling import SamplingParams


class EngineClient(Protocol):
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, resumed: tuple[int, ...] = ()
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last one has `finished` set. Leaving the iteration early
        (a cancelled consumer) aborts the request and frees its blocks. `resumed`: tokens its client already
        has (from a replica that was lost): generation continues after them and they are not streamed again."""
        ...

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      resumed: tuple[int, ...] = ()) -> RequestOutput:
        """Prefill role: run the prompt (and `resumed`), sample the next token; the output carries the
        KVHandoff."""
        ...

    def generate_from_handoff(self, handoff: KVHandoff) -> AsyncIterator[RequestOutput]:
        """Decode role: continue a prefilled sequence, streaming from its first token on."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def describe(self) -> dict[str, str]:
        """How the engine runs (device, kernel path, CUDA graphs), for the start-up log and `r1serve status`."""
        ...

    def cached_prefix_hashes(self, limit: int) -> list[int]:
        """Hashes of the newest `limit` prefix blocks the engine's cache holds (published to the router)."""
        ...

    def shutdown(self) -> None:
        """Stop stepping and release the device (after the pool has drained)."""
        ...

    @property
    def healthy(self) -> bool: ...


async def last_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """Drain a request's stream; its last output (the finished one) carries totals and any hand-off."""
    last = None
    async for out in stream:
        last = out
    return last
