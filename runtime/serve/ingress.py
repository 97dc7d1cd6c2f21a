"""The Ingress deployment: r1serve.v1.Inference over Serve's gRPC proxy, OpenAI HTTP over its HTTP proxy.

Both APIs share validation (Frontend), the request path (Pipeline) and the error vocabulary (errors);
this module only speaks the two wire formats.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' annotations, and serve.ingress
# pickles the class by value, so string annotations could not be resolved in the replica.
import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from r1serve.spec import R1Deployment
from r1serve.spec import constants as C

from . import grpc_api, openai_api, status_api
from .auth import BearerAuth, resolve_token
from .connector import connector_name
from .errors import ServeError, Status, quiet_client_errors
from .frontend import Frontend
from .metrics import IngressMetrics
from .pipeline import Pipeline
from .status_board import read_board

log = logging.getLogger(__name__)

HEALTH_WATCH_INTERVAL_S = 5.0
SERVICE_NAME = "r1serve.v1.Inference"

api = FastAPI(title="r1serve", docs_url=None, redoc_url=None)
api.include_router(status_api.router)  # GET /r1serve/v1/status: scaling decisions (status_api.py)


# Helpers come before the class: serve.ingress pickles the class when it is decorated.
def _set_grpc_status(context, error: ServeError) -> None:
    if context is not None:
        context.set_code(grpc.StatusCode[error.status.grpc_name])
        context.set_details(error.message)


def _openai_error(error: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status is Status.RESOURCE_EXHAUSTED else None
    if error.status is Status.UNAUTHENTICATED:
        headers = {"WWW-Authenticate": "Bearer"}
    if error.status is Status.INTERNAL:
        log.error("request failed: %s", error.message)
    return JSONResponse(error.openai_body(), status_code=error.status.http_status, headers=headers)


@serve.ingress(api)
class Ingress:
    def __init__(self, deployment: R1Deployment, checkpoint: str, decode: DeploymentHandle,
                 prefill: DeploymentHandle | None = None):
        quiet_client_errors()
        self.deployment = deployment
        self.frontend = Frontend(self.deployment, Path(checkpoint))
        self.auth = BearerAuth(resolve_token(self.deployment.spec.api.auth))
        self.pipeline = Pipeline(decode, prefill, IngressMetrics(self.frontend.facts.name))
        self._pools = {"decode": decode, **({"prefill": prefill} if prefill is not None else {})}

    # -- gRPC: r1serve.v1.Inference -------------------------------------------------------------

    async def Generate(self, request, grpc_context) -> AsyncIterator:
        try:
            self.auth.check_grpc(grpc_context)
            pool_request, client_id = grpc_api.prepare(self.frontend, request)
            async for out in self.pipeline.stream(pool_request, fields=grpc_api.FIELDS):
                yield grpc_api.to_proto(out, client_id)
        except ServeError as error:
            _set_grpc_status(grpc_context, error)
            raise

    async def GenerateUnary(self, request, grpc_context):
        try:
            self.auth.check_grpc(grpc_context)
            pool_request, client_id = grpc_api.prepare(self.frontend, request)
            out = await self.pipeline.complete(pool_request, fields=grpc_api.FIELDS)
            return grpc_api.to_proto(out, client_id)
        except ServeError as error:
            # Unary calls can carry the status on the context without raising (no error log per client
            # mistake); streams cannot: the context reaches the proxy only with a message or an exception.
            _set_grpc_status(grpc_context, error)
            return grpc_api.empty_response()

    async def GetModelInfo(self, request, grpc_context=None):
        try:
            self.auth.check_grpc(grpc_context)
        except ServeError as error:
            _set_grpc_status(grpc_context, error)
            return grpc_api.empty_model_info()
        spec = self.deployment.spec
        pools = spec.active_pools()
        return grpc_api.model_info(
            self.frontend.facts, disaggregated=self.pipeline.disaggregated,
            prefill_ep=pools["prefill"].expert_parallel if "prefill" in pools else 0,
            decode_ep=pools["decode"].expert_parallel, connector=connector_name(self.deployment),
            weights=await self._weight_format())

    async def _weight_format(self) -> str:
        """model.weights as the decode replicas resolved it and report it, or the spec's before any did."""
        try:
            board = await asyncio.wait_for(read_board(), timeout=5)
        except Exception:  # noqa: BLE001 - the answer stays useful without the board
            log.warning("could not read the status board for GetModelInfo", exc_info=True)
            board = {}
        engine = (board.get("decode") or {}).get("engine") or {}
        return str(engine.get("weights") or self.deployment.spec.model.weights)

    # -- gRPC: grpc.health.v1.Health --------------------------------------------------------------

    async def Check(self, request, grpc_context):
        if request.service not in ("", SERVICE_NAME):
            error = ServeError(Status.NOT_FOUND, f"service: unknown service {request.service!r}", "service")
            _set_grpc_status(grpc_context, error)
            raise error
        return health_pb2.HealthCheckResponse(status=await self._serving_status())

    async def Watch(self, request, grpc_context):
        last = None
        while True:
            status = await self._serving_status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)

    async def _serving_status(self) -> int:
        """SERVING while the application is RUNNING, every deployment HEALTHY (the controller's view:
        asking the pools themselves would queue behind real requests when they are busy)."""
        try:
            app = (await asyncio.to_thread(serve.status)).applications.get(C.SERVE_APP_NAME)
        except Exception:  # noqa: BLE001 - any failure means not serving
            return health_pb2.HealthCheckResponse.NOT_SERVING
        healthy = app is not None and app.status == "RUNNING" and all(
            d.status == "HEALTHY" for d in app.deployments.values())
        return health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING

    async def pool_stats(self) -> dict[str, dict]:
        """Engine stats of one replica of each pool (for tests and `r1serve status`)."""
        names = list(self._pools)
        results = await asyncio.gather(*(self._pools[n].stats.remote() for n in names))
        return dict(zip(names, results))

    # -- HTTP: OpenAI-compatible -----------------------------------------------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.chat_request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.completion_request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self.auth.check(request.headers.get("authorization"))
        except ServeError as error:
            return _openai_error(error)
        facts = self.frontend.facts
        return JSONResponse(openai_api.models_response(facts.name, facts.max_model_len))

    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    async def _openai(self, request: Request, parse) -> Response:
        try:
            self.auth.check(request.headers.get("authorization"))
            parsed = parse(self.frontend, openai_api.parse_body(await request.body()))
            if not parsed.stream:
                out = await self.pipeline.complete(parsed.pool, fields=parsed.fields)
                return JSONResponse(openai_api.full_response(parsed, self.frontend.facts.name, out))
            stream = self.pipeline.stream(parsed.pool, fields=parsed.fields)
            first = await anext(stream)  # failures before the first token still get a status code
        except ServeError as error:
            return _openai_error(error)
        except StopAsyncIteration:
            return _openai_error(ServeError(Status.INTERNAL, "the engine produced no output"))
        return StreamingResponse(self._sse(parsed, stream, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(self, parsed, stream, first) -> AsyncIterator[bytes]:
        model = self.frontend.facts.name
        try:
            for chunk in openai_api.stream_chunks(parsed, model, first, first=True):
                yield openai_api.sse(chunk)
            async for out in stream:
                for chunk in openai_api.stream_chunks(parsed, model, out, first=False):
                    yield openai_api.sse(chunk)
        except ServeError as error:
            yield openai_api.sse(error.openai_body())
        finally:
            await stream.aclose()
        yield openai_api.sse("[DONE]")


__all__ = ["Ingress"]
