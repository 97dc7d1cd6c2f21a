"""The gRPC TLS front: a TLS client reaches a plaintext backend with streams, status, metadata, deadline and
cancellation intact, and a plaintext client cannot talk to the TLS port. The last test puts it in front of
the real local Serve graph."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc
from r1serve.runtime.serve import client, local
from r1serve.runtime.serve.grpc_tls import TLSFront, TLSFrontThread, forwardable
from r1serve.runtime.serve.self_signed import write_self_signed
from r1serve.spec import load_r1deployment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"

WAIT_S = 10.0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1: (cert path, key path, cert PEM)."""
    folder = tmp_path_factory.mktemp("tls")
    cert_pem = write_self_signed(folder)
    return folder / "tls.crt", folder / "tls.key", cert_pem


class Backend(pb_grpc.InferenceServicer):
    """A plaintext stand-in for Serve's gRPC proxy; the prompt text picks the behaviour."""

    def __init__(self) -> None:
        self.release = asyncio.Event()            # set (on the loop) to let `stream` send its 2nd message
        self.started = threading.Event()          # a `hang` call reached the backend
        self.cancelled = threading.Event()        # ... and was cancelled there
        self.time_remaining: list[float | None] = []

    async def Generate(self, request, context):
        md = dict(context.invocation_metadata())
        await context.send_initial_metadata((("x-backend", "initial"),))
        yield pb.GenerateResponse(request_id=md.get("x-request-id", ""),
                                  content=md.get("authorization", ""), token_ids=[1])
        if request.text == "stream":
            await self.release.wait()  # only after the client has seen message 1: no buffering
            yield pb.GenerateResponse(content="second", token_ids=[2], finished=True)
        elif request.text == "hang":
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif request.text == "fail-midway":
            context.set_trailing_metadata((("x-backend", "trailing"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    async def GenerateUnary(self, request, context):
        self.time_remaining.append(context.time_remaining())
        if request.text == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty",
                                (("x-reason", "empty"),))
        context.set_trailing_metadata((("x-backend", "trailing"),))
        return pb.GenerateResponse(content=f"echo {request.text}", finished=True)


class Loop:
    """An event loop in a thread, for the aio servers; tests stay synchronous like real clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)


@pytest.fixture(scope="module")
def front(tls_files):
    """(backend servicer, TLS target, CA PEM) with backend and front on one loop thread."""
    cert, key, cert_pem = tls_files
    loop, backend = Loop(), Backend()
    # The asyncio.Event must belong to the loop thread.
    backend.release = loop.run(_make_event())

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(backend, server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        backend.target = f"127.0.0.1:{port}"
        tls = TLSFront("127.0.0.1:0", f"127.0.0.1:{port}", cert, key)
        return server, tls, await tls.start()

    server, tls, port = loop.run(start())
    yield backend, f"127.0.0.1:{port}", cert_pem, loop
    loop.run(tls.stop(0))
    loop.run(server.stop(0))
    loop.close()


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


def tls_stub(target: str, cert_pem: bytes) -> tuple[grpc.Channel, pb_grpc.InferenceStub]:
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=cert_pem))
    return channel, pb_grpc.InferenceStub(channel)


METADATA = client.metadata("s3cret") + (("x-request-id", "req-7"),)


def test_streams_arrive_incrementally_with_metadata(front):
    backend, target, cert_pem, loop = front
    channel, stub = tls_stub(target, cert_pem)
    with channel:
        call = stub.Generate(pb.GenerateRequest(text="stream"), metadata=METADATA, timeout=WAIT_S)
        first = next(call)
        # The backend holds message 2 until now: had the front buffered, message 1 would not be here.
        assert (first.request_id, first.content, list(first.token_ids)) == ("req-7", "Bearer s3cret", [1])
        loop.loop.call_soon_threadsafe(backend.release.set)
        assert [r.content for r in call] == ["second"]
        assert ("x-backend", "initial") in call.initial_metadata()
        assert call.code() == grpc.StatusCode.OK


def test_unary_call_with_trailing_metadata_and_deadline(front):
    backend, target, cert_pem, _ = front
    channel, stub = tls_stub(target, cert_pem)
    with channel:
        response, call = stub.GenerateUnary.with_call(pb.GenerateRequest(text="hi"), metadata=METADATA,
                                                      timeout=5.0)
        assert response.content == "echo hi"
        assert ("x-backend", "trailing") in call.trailing_metadata()
        # The client's deadline reached the backend (grpc-timeout is rounded up on the wire, and the
        # two clocks are read at different moments, so allow a little slack over 5 s).
        assert 0 < backend.time_remaining[-1] < 5.5
        stub.GenerateUnary(pb.GenerateRequest(text="no deadline"))
        assert backend.time_remaining[-1] is None


def test_status_details_and_trailers_come_back_unchanged(front):
    _, target, cert_pem, _ = front
    channel, stub = tls_stub(target, cert_pem)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.GenerateUnary(pb.GenerateRequest(text="bad"), timeout=WAIT_S)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        assert ("x-reason", "empty") in info.value.trailing_metadata()

        call = stub.Generate(pb.GenerateRequest(text="fail-midway"), timeout=WAIT_S)
        assert list(next(call).token_ids) == [1]  # what was streamed before the error arrives
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        assert ("x-backend", "trailing") in info.value.trailing_metadata()


def test_client_cancellation_cancels_the_backend_call(front):
    backend, target, cert_pem, _ = front
    channel, stub = tls_stub(target, cert_pem)
    with channel:
        call = stub.Generate(pb.GenerateRequest(text="hang"), timeout=60)
        next(call)
        assert backend.started.wait(WAIT_S)
        call.cancel()
        assert backend.cancelled.wait(WAIT_S), "the backend call was not cancelled"


def test_health_passes_through(front):
    _, target, cert_pem, _ = front
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=cert_pem)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_use_the_tls_port(front):
    _, target, _, _ = front
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="hi"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_untrusted_certificate_is_refused(front):
    _, target, _, _ = front
    with grpc.secure_channel(target, grpc.ssl_channel_credentials()) as channel:  # system roots only
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="hi"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_forwardable_drops_pseudo_reserved_and_hop_by_hop_keys():
    metadata = ((":authority", "x"), ("grpc-timeout", "1S"), ("user-agent", "ua"), ("te", "trailers"),
                ("authorization", "Bearer t"), ("x-request-id", "r"), ("trace-bin", b"\x00"))
    assert forwardable(metadata) == (("authorization", "Bearer t"), ("x-request-id", "r"),
                                     ("trace-bin", b"\x00"))
    assert forwardable(None) == ()


def test_thread_front_starts_and_stops(tls_files):
    cert, key, _ = tls_files
    front = TLSFrontThread("127.0.0.1:0", "127.0.0.1:1", cert, key)
    assert front.start() > 0
    front.stop(0)
    front.stop(0)  # idempotent


def test_a_renewed_certificate_is_served_to_new_connections(front, tmp_path):
    backend = front[0]
    old_pem = write_self_signed(tmp_path)
    tls = TLSFrontThread("127.0.0.1:0", backend.target, tmp_path / "tls.crt", tmp_path / "tls.key")
    target = f"127.0.0.1:{tls.start()}"

    def call(trusted: bytes) -> grpc.StatusCode:
        # A private subchannel pool: every call makes a new connection, hence a new handshake.
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=trusted),
                                 options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="x"), timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

    try:
        assert call(old_pem) == grpc.StatusCode.OK
        new_pem = write_self_signed(tmp_path)  # cert-manager renewed the Secret
        assert call(new_pem) == grpc.StatusCode.OK
        assert call(old_pem) == grpc.StatusCode.UNAVAILABLE
    finally:
        tls.stop(0)


def test_unreadable_key_fails_before_serving(tls_files, tmp_path):
    cert, _, _ = tls_files
    with pytest.raises(FileNotFoundError):
        TLSFront("127.0.0.1:0", "127.0.0.1:1", cert, tmp_path / "missing.key")


def test_files_that_are_not_a_matching_pem_pair_are_refused_by_name(tls_files, tmp_path):
    cert, key, _ = tls_files
    other = tmp_path / "other"
    other.mkdir()
    write_self_signed(other)  # a second, unrelated key pair
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for cert_file, key_file in ((garbage, key), (cert, garbage), (cert, other / "tls.key")):
        with pytest.raises(ValueError, match="not a PEM certificate chain with its private key") as info:
            TLSFront("127.0.0.1:0", "127.0.0.1:1", cert_file, key_file)
        assert str(cert_file) in str(info.value) and str(key_file) in str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_sidecar_serves_until_sigterm(front, tls_files):
    """`r1serve grpc-tls`, the operator's sidecar command, as its own process."""
    backend, _, cert_pem, _ = front
    cert, key, _ = tls_files
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "r1serve.cli", "grpc-tls", "--listen", f"127.0.0.1:{port}",
         "--backend", backend.target, "--cert", str(cert), "--key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}",
                                 grpc.ssl_channel_credentials(root_certificates=cert_pem)) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)  # the process has bound its port
            response = pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="cli"),
                                                                    timeout=WAIT_S)
            assert response.content == "echo cli"
        process.send_signal(signal.SIGTERM)  # what the kubelet sends when the pod stops
        assert process.wait(timeout=30) == 0, process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _tiny_with_tls(tls: dict, grpc_port: int, http_port: int = 8443):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["api"] = {"grpcPort": grpc_port, "httpPort": http_port, "tls": tls}
    return load_r1deployment(doc)


def test_local_mode_starts_the_front_on_the_api_port(tls_files, monkeypatch):
    cert, key, cert_pem = tls_files
    deployment = _tiny_with_tls({"certFile": str(cert), "keyFile": str(key)}, _free_port())
    local.check_tls_files(deployment)
    assert local.endpoints(deployment) == {
        "grpc": f"localhost:{deployment.spec.api.grpc_port}", "http": "https://localhost:8443/v1"}
    front = local.start_tls_front(deployment)
    try:
        with grpc.secure_channel(f"127.0.0.1:{deployment.spec.api.grpc_port}",
                                 grpc.ssl_channel_credentials(root_certificates=cert_pem)) as channel:
            # Listening on TLS; nothing behind it here, so the call fails as a missing backend does.
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.InferenceStub(channel).GenerateUnary(pb.GenerateRequest(text="x"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        front.stop(0)


def test_local_mode_names_the_port_it_cannot_take(tls_files):
    cert, key, _ = tls_files
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        deployment = _tiny_with_tls({"certFile": str(cert), "keyFile": str(key)}, taken.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"spec\.api\.grpcPort: the gRPC TLS front cannot listen"):
            local.start_tls_front(deployment)


def test_local_mode_refuses_missing_tls_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="operator: set certFile and keyFile"):
        local.check_tls_files(_tiny_with_tls({"secretName": "api-tls"}, 9000))
    with pytest.raises(FileNotFoundError, match=r"spec\.api\.tls\.certFile"):
        local.check_tls_files(_tiny_with_tls({"certFile": str(tmp_path / "no.pem"),
                                              "keyFile": str(tmp_path / "no.key")}, 9000))


@pytest.mark.slow
def test_generate_over_tls_through_the_local_graph(cluster, docs, tls_files, reliability):
    cert, key, cert_pem = tls_files
    cluster.deploy(docs.tiny(), {"kind": "mock"})
    front = TLSFrontThread("127.0.0.1:0", cluster.grpc_target, cert, key)
    port = front.start()
    try:
        channel, stub = tls_stub(f"127.0.0.1:{port}", cert_pem)
        with channel:
            request = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
            responses = list(stub.Generate(request, metadata=client.METADATA, timeout=60))
        assert responses[-1].finished
        assert sum(len(r.token_ids) for r in responses) == 4
        # What `r1serve generate --target ... --ca-file` does: the same answer.
        again = list(client.stream(f"localhost:{port}", request, timeout_s=60, ca_file=cert))
        assert [r.token_ids for r in again] == [r.token_ids for r in responses]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.InferenceStub(plain).Generate(request, metadata=client.METADATA, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        front.stop()
    reliability("access-grpc-tls", "access", what="Generate through the gRPC TLS front into the local graph: "
                "with the certificate pinned by the client, by `r1serve generate --ca-file`, and in plaintext",
                requests=3, failed=0, failures="none: both TLS calls streamed the same 4 tokens, the plaintext "
                "call was refused (UNAVAILABLE)")
