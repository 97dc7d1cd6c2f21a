"""One request's path through the pools, as the Ingress drives it.

Disaggregated: prefill replica (`prefill` → first token + KV ticket), then decode replica
(`generate_from_handoff`, streamed). Otherwise the single pool's `generate`. Closing the stream early
(client gone, deadline passed) cancels the in-flight handle call, which closes the replica's generator,
which aborts the engine's request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType

from ray.serve.handle import DeploymentHandle

from r1serve.runtime.engine.outputs import RequestOutput

from .errors import ServeError, Status, classify
from .messages import PoolRequest, PrefillResult, from_wire, merge_outputs
from .metrics import IngressMetrics
from .streams import coalesced

# A replica that dies before the request's first output (killed, engine failed, KV hand-off lost): Serve
# routes the retry to another (or the replacement) replica.
RETRIES_BEFORE_FIRST_OUTPUT = 2
RETRY_BACKOFF_S = 0.5
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
        """The pools' outputs; a request whose replica fails before any output is sent again, transparently
        (the client has seen nothing, so a second replica's answer is indistinguishable from the first's)."""
        for attempt in range(RETRIES_BEFORE_FIRST_OUTPUT + 1):
            produced = False
            try:
                async for out in self._through_pools(request):
                    produced = True
                    yield out
                return
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - classified: only UNAVAILABLE is retried
                error = classify(exc, fields=fields)
                if produced or error.status is not Status.UNAVAILABLE or attempt == RETRIES_BEFORE_FIRST_OUTPUT:
                    raise error from None
            await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))

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


async def _cancellable(response) -> PrefillResult:
    """Await a unary handle call; if we are cancelled meanwhile, cancel it on the replica too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
