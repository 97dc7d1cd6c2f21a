"""One error vocabulary for both APIs: each failure becomes a status with a gRPC code, an HTTP code and an
OpenAI error type, and a message that names the field at fault."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from types import MappingProxyType

from r1serve.runtime.engine.outputs import EngineUnavailableError, KVTransferError, RequestError
from r1serve.runtime.engine.sampling import SamplingParamsError
from r1serve.runtime.tokenizer import TokenizerError


class Status(enum.Enum):
    """(gRPC status code name, HTTP status, OpenAI error type, OpenAI error code)."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400, "invalid_request_error", "invalid_value")
    NOT_FOUND = ("NOT_FOUND", 404, "invalid_request_error", "model_not_found")
    UNAUTHENTICATED = ("UNAUTHENTICATED", 401, "invalid_request_error", "invalid_api_key")
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", 429, "rate_limit_error", "overloaded")
    UNAVAILABLE = ("UNAVAILABLE", 503, "server_error", "unavailable")
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504, "server_error", "timeout")
    CANCELLED = ("CANCELLED", 499, "server_error", "cancelled")
    INTERNAL = ("INTERNAL", 500, "server_error", "internal_error")

    @property
    def grpc_name(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


class EngineFailure(EngineUnavailableError):
    """A pool replica's engine ended a request with an error, or stopped: the replica is unhealthy."""


class ServeError(Exception):
    """A request failure as clients see it; `param` is the offending request field, if any, and `problem`
    what is wrong with it (the message is "param: problem")."""

    def __init__(self, status: Status, message: str, param: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.problem = status, message, param, problem

    def __reduce__(self):  # crosses process boundaries (replica -> Ingress -> proxy) intact
        return ServeError, (self.status, self.message, self.param, self.problem)

    def named_by(self, fields: Mapping[str, str]) -> ServeError:
        """The same error naming its field as the API does (`fields`: the engine's names -> the API's)."""
        if self.param is None or self.problem is None or self.param not in fields:
            return self
        return ServeError(self.status, f"{fields[self.param]}: {self.problem}", fields[self.param], self.problem)

    def openai_body(self) -> dict:
        _, _, kind, code = self.status.value
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def invalid(param: str, problem: str) -> ServeError:
    """INVALID_ARGUMENT whose message starts with the field's name, like the engine's own errors."""
    return ServeError(Status.INVALID_ARGUMENT, f"{param}: {problem}", param, problem)


def classify(exc: BaseException, *, fields: Mapping[str, str] = MappingProxyType({})) -> ServeError:
    """The ServeError for any exception raised while serving a request (locally or in a replica).

    `fields` maps the engine's field names (max_tokens, temperature, prompt, ...) to the names the
    client's API uses (sampling.max_tokens over gRPC, max_completion_tokens, messages, ...).
    """
    exc = _unwrap(exc)
    if isinstance(exc, ServeError):
        return exc.named_by(fields)
    if isinstance(exc, (SamplingParamsError, RequestError)):
        if exc.field is None:  # e.g. "unknown sampling parameter(s): ..." names the fields itself
            return ServeError(Status.INVALID_ARGUMENT, str(exc))
        return invalid(exc.field, exc.problem).named_by(fields)
    if isinstance(exc, TokenizerError):
        return invalid("messages", str(exc))
    return _classify_runtime(exc)


def _classify_runtime(exc: BaseException) -> ServeError:
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    if isinstance(exc, serve_errors.BackPressureError):
        return ServeError(Status.RESOURCE_EXHAUSTED, f"the server is overloaded, retry later ({exc.message})")
    if isinstance(exc, (serve_errors.RequestCancelledError, asyncio.CancelledError)):
        return ServeError(Status.CANCELLED, "the request was cancelled")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ray_errors.GetTimeoutError)):
        return ServeError(Status.DEADLINE_EXCEEDED, f"the request timed out: {exc}")
    # EngineUnavailableError: the engine's step failed or its expert-parallel group lost a rank.
    unavailable = (KVTransferError, EngineUnavailableError, ray_errors.RayActorError,
                   ray_errors.ActorUnavailableError, serve_errors.DeploymentUnavailableError,
                   ray_errors.ObjectLostError)
    if isinstance(exc, unavailable):
        return ServeError(Status.UNAVAILABLE, f"no healthy replica could serve the request: {_first_line(exc)}")
    return ServeError(Status.INTERNAL, f"internal error: {type(exc).__name__}: {_first_line(exc)}")


def _unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError carries it as `cause`)."""
    from ray.exceptions import RayTaskError

    seen = 0
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# Statuses that are the client's doing: not worth a traceback in the server's log.
CLIENT_STATUSES = frozenset({Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.UNAUTHENTICATED,
                             Status.RESOURCE_EXHAUSTED, Status.CANCELLED})


class ClientErrorLogFilter(logging.Filter):
    """Drops Serve's "Request failed." tracebacks for client errors (a stream can only report its gRPC
    status by raising, and Serve logs every raise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        seen = 0
        while exc is not None and seen < 8:
            if isinstance(exc, ServeError):
                return exc.status not in CLIENT_STATUSES
            exc = getattr(exc, "original_exception", None) or exc.__cause__
            seen += 1
        return True


def quiet_client_errors(logger_name: str = "ray.serve") -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, ClientErrorLogFilter) for f in logger.filters):
        logger.addFilter(ClientErrorLogFilter())
