"""The r1serve.v1.Inference messages <-> the engine's requests and outputs (no I/O here)."""

from __future__ import annotations

import dataclasses

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.runtime.engine.outputs import RequestOutput
from r1serve.runtime.engine.sampling import SamplingParams, SamplingParamsError

from .errors import classify, invalid
from .frontend import Frontend, ModelFacts, new_request_id
from .grpc_servicer import UndecodableRequest
from .messages import PoolRequest

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "skip_special_tokens")
# The engine's field names -> this API's: the sampling parameters live in `sampling`.
FIELDS = {**{f.name: f"sampling.{f.name}" for f in dataclasses.fields(SamplingParams)},
          "prompt_token_ids": "prompt.token_ids.ids"}
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ABORT}


def prepare(frontend: Frontend, request: pb.GenerateRequest) -> tuple[PoolRequest, str]:
    """A validated PoolRequest and the id to echo to the client; raises ServeError naming the field."""
    if isinstance(request, UndecodableRequest):
        raise invalid("request", f"not a valid {request.message_type} (a corrupt message, or a string field "
                                 f"that is not UTF-8): {request.problem}")
    frontend.check_model(request.model)
    prompt = _prompt(frontend, request)
    requested = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
    params = _sampling(request.sampling, frontend.max_tokens("grpc", requested, prompt))
    frontend.check_lengths(prompt, params.max_tokens, FIELDS)
    try:
        params.check_against(frontend.facts.vocab_size)
    except SamplingParamsError as exc:
        raise classify(exc, fields=FIELDS) from None
    internal = new_request_id(request.request_id or "grpc")
    return PoolRequest(internal, prompt, params), request.request_id or internal


def _prompt(frontend: Frontend, request: pb.GenerateRequest) -> list[int]:
    which = request.WhichOneof("prompt")
    if which == "text":
        return frontend.encode_text(request.text, "prompt.text")
    if which == "token_ids":
        return frontend.check_token_ids(list(request.token_ids.ids), "prompt.token_ids.ids")
    if which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        return frontend.encode_chat(messages, "prompt.chat.messages")
    raise invalid("prompt", "set one of text, token_ids or chat")


def _sampling(msg: pb.SamplingParams, max_tokens: int) -> SamplingParams:
    data: dict = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    data["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "min_p"):
        if name in data:  # float32 on the wire: 0.9 arrives as 0.8999999761...; keep what the client wrote
            data[name] = float(f"{data[name]:.7g}")
    data.update(stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                include_stop_str_in_output=msg.include_stop_str_in_output)
    try:
        return SamplingParams.from_dict(data)
    except SamplingParamsError as exc:
        raise classify(exc, fields=FIELDS) from None


def to_proto(out: RequestOutput, request_id: str) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=request_id, reasoning=out.reasoning, content=out.content,
                                   token_ids=out.token_ids, finished=out.finished)
    if out.finished:
        response.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        response.usage.CopyFrom(pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                         total_tokens=out.prompt_tokens + out.completion_tokens,
                                         cached_prompt_tokens=out.cached_tokens))
    return response


def empty_response() -> pb.GenerateResponse:
    return pb.GenerateResponse()


def empty_model_info() -> pb.ModelInfo:
    return pb.ModelInfo()


def model_info(facts: ModelFacts, *, disaggregated: bool, prefill_ep: int, decode_ep: int,
               connector: str, weights: str) -> pb.ModelInfo:
    return pb.ModelInfo(model=facts.name, max_model_len=facts.max_model_len, vocab_size=facts.vocab_size,
                        dtype=facts.dtype, disaggregated=disaggregated, prefill_expert_parallel=prefill_ep,
                        decode_expert_parallel=decode_ep, kv_connector=connector, weights=weights)
