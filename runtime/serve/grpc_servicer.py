"""Registers r1serve.v1.Inference on Serve's gRPC proxies, with request parsing that cannot fail.

The generated `add_InferenceServicer_to_server` parses requests in the proxy, so a corrupt message or a
string field that is not UTF-8 ends as UNKNOWN ("Unexpected DecodeError") before any of our code runs.
Here a message that does not parse travels to the Ingress as an `UndecodableRequest`, which the Ingress
refuses with INVALID_ARGUMENT like any other bad request. Imported by the proxy: no ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from r1serve.protos.r1serve.v1 import inference_pb2 as pb

SERVICE = "r1serve.v1.Inference"


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request message that did not parse; `problem` says why."""

    message_type: str
    problem: str


def tolerant(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)
    return parse


def add_InferenceServicer_to_server(servicer, server) -> None:
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateUnary": grpc.unary_unary_rpc_method_handler(
            servicer.GenerateUnary, request_deserializer=tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=tolerant(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
