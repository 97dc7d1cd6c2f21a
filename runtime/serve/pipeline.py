"""One request's path through the pools, as the Ingress drives it.

Disaggregated: prefill replica (`prefill` → first token + KV ticket), then decode replica
(`generate_from_handoff`, streamed). Otherwise the single pool's `generate`. Closing the stream early
(client gone, deadline passed) cancels the in-flight handle call, which closes the replica's generator,
which aborts the engine's request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from types import MappingProxyType

from ray.serve.handle import DeploymentHandle

from r1serve.runtime.engine.outputs import RequestOutput

from .errors import ServeError, Status, classify
from .messages import PoolRequest, PrefillResult, from_wire, merge_outputs
from .metrics import IngressMetrics
from .streams import coalesced

# A replica that fails a request (killed, engine failed, KV hand-off lost): Serve routes the retry to
# another (or the replacement) replica. Before the first output the request is simply sent again; after
# it, a request whose continuation is well defined resumes after the tokens its client already has.
# Routers learn that a replica's engine failed from its stats within seconds and Serve's health check
# replaces it within ~10 s; until then a retry may land on it again, so retries span that long.
RETRIES = 8
RETRY_BACKOFF_S = 0.5
MAX_RETRY_BACKOFF_S = 2.0
NO_RENAMES: Mapping[str, str] = MappingProxyType({})


class Pipeline:
    def __init__(self, decode: DeploymentHandle, prefill: DeploymentHandle | None, metrics: IngressMetrics):
        self._decode = decode.options(stream=True)
        self._prefill = prefill
        self._metrics = metrics

    @property
    def disaggregated(self) -> bool:
        return self._prefill is not None

    async def stream(self, request: PoolRequest, *, fields: Mapping[str, str] = NO_RENAMES
                     ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, coalesced when the consumer lags; failures raise ServeError naming fields as
        `fields` (the engine's names -> the client API's) says."""
        timer = self._metrics.request()
        status = "OK"
        try:
            async for out in coalesced(self._retrying(request, fields), merge_outputs):
                timer.tokens(len(out.token_ids), out.prompt_tokens)
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - every failure reaches the client as a ServeError
            error = classify(exc, fields=fields)
            status = error.status.grpc_name
            raise error from None
        finally:
            timer.finish(status)

    async def complete(self, request: PoolRequest, *, fields: Mapping[str, str] = NO_RENAMES) -> RequestOutput:
        """The whole generation merged into one output."""
        outputs = [out async for out in self.stream(request, fields=fields)]
        if not outputs:
            raise ServeError(Status.INTERNAL, "the engine produced no output")
        return merge_outputs(outputs)

    async def _retrying(self, request: PoolRequest, fields: Mapping[str, str]) -> AsyncIterator[RequestOutput]:
        """The pools' outputs. A request whose replica fails with UNAVAILABLE is sent again, transparently:
        before any output as it was; after some, resumed (prompt plus the tokens already sent, which the
        engine computes again and does not stream twice), when `resumable`."""
        sent: list[int] = []
        for attempt in range(RETRIES + 1):
            current = request if not sent else replace(request, request_id=f"{request.request_id}~{attempt}",
                                                       resumed_token_ids=tuple(sent))
            try:
                async for out in self._through_pools(current):
                    sent.extend(out.token_ids)
                    yield out
                return
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - classified: only UNAVAILABLE is retried
                error = classify(exc, fields=fields)
                if error.status is not Status.UNAVAILABLE or attempt == RETRIES or (sent and not resumable(request)):
                    raise error from None
            await asyncio.sleep(min(RETRY_BACKOFF_S * (attempt + 1), MAX_RETRY_BACKOFF_S))

    async def _through_pools(self, request: PoolRequest) -> AsyncIterator[RequestOutput]:
        if self._prefill is None:
            response = self._decode.generate.remote(request)
        else:
            prefilled = await _cancellable(self._prefill.prefill.remote(request))
            response = self._decode.generate_from_handoff.remote(prefilled.ticket)
        try:
            async for data in response:
                yield from_wire(data)
        finally:
            response.cancel()  # no-op once finished; otherwise the decode replica stops and frees the request


def resumable(request: PoolRequest) -> bool:
    """Whether a request that already streamed tokens may continue on another replica as if undisturbed:
    greedy, or sampled without a seed (a seeded request promises one reproducible draw, and its generator's
    state went with the replica)."""
    return request.params.is_greedy or request.params.seed is None


async def _cancellable(response) -> PrefillResult:
    """Await a unary handle call; if we are cancelled meanwhile, cancel it on the replica too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
