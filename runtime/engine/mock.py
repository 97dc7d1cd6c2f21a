"""A model-free EngineClient for testing the layers above the engine (Serve graph, RPC, routing)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import torch

from .limits import check_fits
from .outputs import EngineStats, KVHandoff, RequestError, RequestOutput, Role
from .sampling import SamplingParams


class MockEngine:
    """Deterministic tokens (a function of the prompt and position), optional per-token and prefill delays.

    Tracks running requests and fake KV blocks the way the real engine does, so tests above can check
    that cancellation and errors free what a request held.
    """

    def __init__(self, *, role: Role = "both", vocab_size: int = 129280, max_model_len: int = 4096,
                 token_delay_s: float = 0.0, prefill_delay_s: float = 0.0, block_size: int = 16,
                 num_blocks: int = 4096):
        self.role, self.vocab_size, self.max_model_len = role, vocab_size, max_model_len
        self.token_delay_s, self.block_size, self.num_blocks = token_delay_s, block_size, num_blocks
        self.prefill_delay_s = prefill_delay_s
        self.running: dict[str, int] = {}  # request id -> blocks held
        self.finished = 0
        self.healthy = True

    @staticmethod
    def token_at(prompt_token_ids: list[int], index: int, vocab_size: int = 129280) -> int:
        return (sum(prompt_token_ids) * 31 + index * 7919 + 17) % vocab_size

    def describe(self) -> dict[str, str]:
        return {"device": "none", "kernels": "mock", "cudaGraphs": "off"}

    def cached_prefix_hashes(self, limit: int) -> list[int]:
        return []  # it caches nothing

    def shutdown(self) -> None:
        pass

    def stats(self) -> EngineStats:
        used = sum(self.running.values())
        return EngineStats(self.role, 0, len(self.running), 0, self.num_blocks, used, self.num_blocks - used,
                           0, 0, 0, self.finished)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       resumed: tuple[int, ...] = ()) -> AsyncIterator[RequestOutput]:
        self._admit(request_id, prompt_token_ids, params)
        async for out in self._emit(request_id, prompt_token_ids, params, start=len(resumed)):
            yield out

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      resumed: tuple[int, ...] = ()) -> RequestOutput:
        self._admit(request_id, prompt_token_ids, params)
        try:
            if self.prefill_delay_s:  # tests: a window in which the request sits in a prefill replica
                await asyncio.sleep(self.prefill_delay_s)
        finally:
            self._release(request_id)
        first = self.token_at(prompt_token_ids, len(resumed), self.vocab_size)
        handoff = KVHandoff(request_id, list(prompt_token_ids), first, params,
                            latents=torch.zeros(1, len(prompt_token_ids) + len(resumed), 1),
                            resumed_token_ids=list(resumed))
        return RequestOutput(request_id, [first], finished=True, finish_reason="stop",
                             prompt_tokens=len(prompt_token_ids), completion_tokens=1, handoff=handoff)

    async def generate_from_handoff(self, handoff: KVHandoff) -> AsyncIterator[RequestOutput]:
        self._admit(handoff.request_id, handoff.prompt_token_ids, handoff.params)
        async for out in self._emit(handoff.request_id, handoff.prompt_token_ids, handoff.params,
                                    start=len(handoff.resumed_token_ids)):
            yield out

    async def abort(self, request_id: str) -> None:
        self._release(request_id)

    def _admit(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.running:
            raise RequestError("request_id", f"{request_id!r} is already running")
        if not prompt:
            raise RequestError("prompt", "is empty")
        check_fits(len(prompt), params.max_tokens, self.max_model_len)
        self.running[request_id] = -(-(len(prompt) + params.max_tokens) // self.block_size)

    def _release(self, request_id: str) -> None:
        if self.running.pop(request_id, None) is not None:
            self.finished += 1

    async def _emit(self, request_id, prompt, params: SamplingParams, start: int) -> AsyncIterator[RequestOutput]:
        try:
            for i in range(start, params.max_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                token = self.token_at(prompt, i, self.vocab_size)
                last = i == params.max_tokens - 1
                yield RequestOutput(request_id, [token], text=f" t{token}", content=f" t{token}", finished=last,
                                    finish_reason="length" if last else None, prompt_tokens=len(prompt),
                                    completion_tokens=i + 1)
        finally:
            self._release(request_id)
