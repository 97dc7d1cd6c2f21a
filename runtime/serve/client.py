"""A small gRPC client of r1serve.v1.Inference (what `r1serve generate --target` uses)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc
from r1serve.spec.constants import SERVE_APP_NAME

METADATA = (("application", SERVE_APP_NAME),)


def build_request(prompt: str, *, chat: bool = False, max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  ignore_eos: bool = False) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(ignore_eos=ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    if chat:
        return pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=prompt)]),
                                  sampling=sampling)
    return pb.GenerateRequest(text=prompt, sampling=sampling)


def metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The call metadata: the Serve application, and the bearer token when there is one."""
    return METADATA + ((("authorization", f"Bearer {token}"),) if token else ())


def channel(target: str, *, tls: bool = False, ca_file: Path | None = None) -> grpc.Channel:
    """A channel to `target`: plaintext, or TLS (api.tls) trusting `ca_file` or else the system's roots."""
    if not tls and ca_file is None:
        return grpc.insecure_channel(target)
    roots = Path(ca_file).read_bytes() if ca_file is not None else None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))


def stream(target: str, request: pb.GenerateRequest, *, timeout_s: float | None = None,
           token: str | None = None, tls: bool = False,
           ca_file: Path | None = None) -> Iterator[pb.GenerateResponse]:
    """The Generate stream's messages; raises grpc.RpcError with the server's status on failure."""
    with channel(target, tls=tls, ca_file=ca_file) as open_channel:
        yield from pb_grpc.InferenceStub(open_channel).Generate(request, metadata=metadata(token),
                                                                timeout=timeout_s)


def print_stream(responses: Iterator[pb.GenerateResponse], out) -> None:
    """Reasoning and answer under their own headings, as they arrive; usage at the end."""
    section = None
    for response in responses:
        for name, text in (("reasoning", response.reasoning), ("answer", response.content)):
            if text and section != name:
                section = name
                print(f"\n--- {name} ---", file=out, flush=True)
            print(text, end="", file=out, flush=True)
        if response.finished:
            reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
            usage = response.usage
            print(f"\n--- {reason}: {usage.prompt_tokens} prompt tokens ({usage.cached_prompt_tokens} cached), "
                  f"{usage.completion_tokens} generated ---", file=out, flush=True)
