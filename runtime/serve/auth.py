"""Bearer-token access to the client APIs: where the accepted token comes from, and the constant-time check.

spec.api.auth names the token's source. On Kubernetes the operator injects the Secret's `token` key as
R1SERVE_API_TOKEN into every Ray pod (render.py); locally `tokenEnv` or `tokenFile` point at it. Health
checks stay open (load balancers and probes carry no token); every other RPC and route needs the token.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from r1serve.spec import constants as C
from r1serve.spec.sections import ApiAuth

from .errors import ServeError, Status

SCHEME = "bearer"
HEADER = "authorization"  # the HTTP header, and the gRPC metadata key (gRPC keys are lower case)


class AuthConfigError(RuntimeError):
    """spec.api.auth is set but no source yields a token: refuse to start rather than serve openly."""


def resolve_token(auth: ApiAuth | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The accepted token, or None when the spec asks for no authentication.

    Sources in order: tokenEnv, tokenFile, then the Secret the operator injected as R1SERVE_API_TOKEN.
    """
    if auth is None:
        return None
    environ = os.environ if environ is None else environ
    tried = []
    if auth.token_env:
        tried.append(f"environment variable {auth.token_env}")
        if (token := environ.get(auth.token_env, "").strip()):
            return token
    if auth.token_file:
        tried.append(f"file {auth.token_file}")
        try:
            if (token := Path(auth.token_file).read_text().strip()):
                return token
        except OSError as exc:
            tried[-1] += f" ({exc.strerror or exc})"
    if auth.secret_name:
        tried.append(f"Secret {auth.secret_name} (as environment variable {C.API_TOKEN_ENV})")
        if (token := environ.get(C.API_TOKEN_ENV, "").strip()):
            return token
    raise AuthConfigError(f"spec.api.auth: no token found in {', '.join(tried)}")


class BearerAuth:
    """Checks `Authorization: Bearer <token>`; with no token configured every request passes."""

    def __init__(self, token: str | None):
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, header: str | None) -> None:
        """Raises UNAUTHENTICATED unless `header` carries the accepted token."""
        if self._token is None:
            return
        if not header:
            raise unauthenticated("missing bearer token (send the header 'authorization: Bearer <token>')")
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != SCHEME or not credentials.strip():
            raise unauthenticated("malformed authorization header (expected 'Bearer <token>')")
        # compare_digest takes time independent of where the first difference is.
        if not hmac.compare_digest(credentials.strip().encode(), self._token):
            raise unauthenticated("invalid bearer token")

    def check_grpc(self, grpc_context) -> None:
        if self._token is None:
            return
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        self.check(grpc_header(metadata))


def grpc_header(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() == HEADER:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def unauthenticated(message: str) -> ServeError:
    return ServeError(Status.UNAUTHENTICATED, message, None)
