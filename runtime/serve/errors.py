"""One error vocabulary for both APIs: each failure becomes a status with a gRPC code, an HTTP code and an
OpenAI error type, and a message that names the field at fault."""

from __future__ import annotations

import asyncio
import enum
import logging
import re

from r1serve.runtime.engine.outputs import EngineUnavailableError, RequestError
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
    """A request failure as clients see it; `param` is the offending request field, if any."""

    def __init__(self, status: Status, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def __reduce__(self):  # crosses process boundaries (replica -> Ingress -> proxy) intact
        return ServeError, (self.status, self.message, self.param)

    def openai_body(self) -> dict:
        _, _, kind, code = self.status.value
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def invalid(param: str, problem: str) -> ServeError:
    """INVALID_ARGUMENT whose message starts with the field's name, like the engine's own errors."""
    return ServeError(Status.INVALID_ARGUMENT, f"{param}: {problem}", param)


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def classify(exc: BaseException, *, field_prefix: str = "") -> ServeError:
    """The ServeError for any exception raised while serving a request (locally or in a replica).

    `field_prefix` is put before field names from sampling-parameter errors (e.g. "sampling." for gRPC).
    """
    exc = _unwrap(exc)
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return _field_error(str(exc), field_prefix)
    if isinstance(exc, RequestError):
        field = exc.field
        message = str(exc)
        if field in ("max_tokens",):
            field, message = field_prefix + field, field_prefix + message
        return ServeError(Status.INVALID_ARGUMENT, message, field)
    if isinstance(exc, TokenizerError):
        return ServeError(Status.INVALID_ARGUMENT, f"messages: {exc}", "messages")
    return _classify_runtime(exc)


def _classify_runtime(exc: BaseException) -> ServeError:
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    from .connector import KVTransferError

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


def _field_error(message: str, prefix: str) -> ServeError:
    match = _FIELD_PREFIX.match(message)
    if match is None:  # e.g. "unknown sampling parameter(s): ..." names the fields itself
        return ServeError(Status.INVALID_ARGUMENT, message, None)
    return ServeError(Status.INVALID_ARGUMENT, prefix + message, prefix + match.group(1))


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
