"""TLS in front of Serve's plaintext gRPC proxy: terminate TLS, forward every call as raw bytes over loopback.

Ray 2.60's gRPC proxy can only listen plaintext (`add_insecure_port`, no TLS field in gRPCOptions), so
with `spec.api.tls` it moves to an internal port and this front takes `api.grpcPort`. It knows no
service: one generic handler forwards any method, so Inference, health and reflection all pass
through, and a new RPC needs no change here. gRPC frames unary and streaming calls alike, so one
stream-stream forwarder carries both. Status, details and metadata travel unchanged both ways,
the deadline goes on to the backend and a client's cancellation cancels the backend call.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# A proxy must not impose its own message-size limit (4 MiB by default): the backend's applies.
_UNLIMITED = (("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1))
# Set per connection or by the gRPC library itself; grpc refuses (or overwrites) them as user
# metadata, so they are dropped rather than forwarded.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                         "upgrade", "te", "host", "content-type", "user-agent"})
SHUTDOWN_GRACE_S = 10.0

Metadata = Sequence[tuple[str, str | bytes]]


def forwardable(metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
    """The end-to-end part of `metadata`: no pseudo-headers (:authority), grpc-* or hop-by-hop keys."""
    return tuple((key, value) for key, value in metadata or ()
                 if not key.startswith((":", "grpc-")) and key not in _HOP_BY_HOP)


class _Forwarder(grpc.GenericRpcHandler):
    """Every method, whatever its service, goes to the same raw-bytes forwarder."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def service(self, handler_call_details):
        method = handler_call_details.method

        async def forward(requests, context: grpc.aio.ServicerContext) -> None:
            await _forward(self._channel, method, requests, context)

        # No (de)serializers: requests and responses stay the bytes on the wire.
        return grpc.stream_stream_rpc_method_handler(forward)


async def _forward(channel: grpc.aio.Channel, method: str, requests,
                   context: grpc.aio.ServicerContext) -> None:
    call = channel.stream_stream(method)(
        requests,  # consumed by grpc as the client sends: client streaming and half-close pass through
        metadata=forwardable(context.invocation_metadata()),
        timeout=context.time_remaining(),  # None without a deadline
    )
    try:
        # Headers first, and only when the backend sent any: an error-only answer then stays a
        # trailers-only response, exactly as the backend wrote it.
        initial = forwardable(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        while (response := await call.read()) is not grpc.aio.EOF:
            await context.write(response)  # each message as it arrives: streams stay streams
        code, details, trailing = grpc.StatusCode.OK, await call.details(), await call.trailing_metadata()
    except grpc.aio.AioRpcError as err:
        code, details, trailing = err.code(), err.details(), err.trailing_metadata()
    finally:
        # The client went away (the server cancels this task) or we failed: stop the backend's
        # work too. A no-op once the call has finished.
        call.cancel()
    context.set_trailing_metadata(forwardable(trailing))
    if code != grpc.StatusCode.OK:
        context.set_code(code)
    if details:
        context.set_details(details)


def _signature(*paths: Path) -> tuple:
    # The kubelet swaps a Secret volume's files through a symlink; stat follows it.
    return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (path.stat() for path in paths))


def check_pair(cert: Path, key: Path) -> None:
    """Raise ValueError naming the files unless they hold a PEM certificate chain and its private key
    (grpc would only report that it failed to bind the port)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(f"TLS files {cert} and {key}: not a PEM certificate chain with its private key "
                         f"({exc.reason or exc})") from None


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS server credentials from PEM files (the certificate may hold the whole chain), re-read
    when the files change: a renewed certificate (cert-manager updating the Secret) is served to
    new connections without restarting the pod."""
    cert, key = Path(cert_file), Path(key_file)

    def load() -> grpc.ServerCertificateConfiguration:
        check_pair(cert, key)
        return grpc.ssl_server_certificate_configuration([(key.read_bytes(), cert.read_bytes())])

    state = {"signature": _signature(cert, key)}
    initial = load()  # raises now on a missing or unreadable file

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before each TLS handshake; None keeps the current certificate.
        try:
            signature = _signature(cert, key)
            if signature == state["signature"]:
                return None
            config = load()
        except (OSError, ValueError) as exc:  # mid-update, removed or bad: keep serving the last good pair
            log.warning("cannot re-read TLS files %s, %s: %s", cert, key, exc)
            return None
        state["signature"] = signature
        log.info("TLS certificate reloaded from %s", cert)
        return config

    return grpc.dynamic_ssl_server_credentials(initial, fetch)


class TLSFront:
    """The front on one event loop: `await start()` binds (raising if it cannot), `await stop()` drains."""

    def __init__(self, listen: str, backend: str, cert_file: str | Path, key_file: str | Path) -> None:
        self.listen, self.backend = listen, backend
        self._credentials = server_credentials(cert_file, key_file)  # read now: bad files fail early
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Start serving; returns the bound port (useful with `host:0`)."""
        self._channel = grpc.aio.insecure_channel(self.backend, options=_UNLIMITED)
        self._server = grpc.aio.server(options=_UNLIMITED)
        self._server.add_generic_rpc_handlers((_Forwarder(self._channel),))
        self.port = self._server.add_secure_port(self.listen, self._credentials)
        await self._server.start()
        log.info("gRPC TLS front on %s -> %s", self.listen, self.backend)
        return self.port

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Refuse new calls, give running ones `grace_s`, then cancel them (and so the backend's)."""
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._channel is not None:
            await self._channel.close()


class TLSFrontThread:
    """The front on its own event loop in a daemon thread, for the synchronous local runner."""

    def __init__(self, listen: str, backend: str, cert_file: str | Path, key_file: str | Path) -> None:
        self._front = TLSFront(listen, backend, cert_file, key_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-tls-front",
                                        daemon=True)

    def start(self, timeout_s: float = 30.0) -> int:
        """Bind and start serving; returns the port, or raises what binding raised."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._front.start(), self._loop).result(timeout_s)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._front.stop(grace_s), self._loop).result(grace_s + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()


async def _serve_until_signal(front: TLSFront) -> None:
    await front.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM: the kubelet stopping the pod
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await front.stop()


def run_front(listen: str, backend: str, cert_file: str | Path, key_file: str | Path) -> int:
    """`r1serve grpc-tls`: serve until SIGINT or SIGTERM (the Kubernetes sidecar's entry point)."""
    front = TLSFront(listen, backend, cert_file, key_file)
    print(f"gRPC TLS front: {listen} -> {backend} (plaintext)", flush=True)
    asyncio.run(_serve_until_signal(front))
    return 0
