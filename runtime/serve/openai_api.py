"""OpenAI-compatible request bodies -> PoolRequests, and outputs -> OpenAI responses and stream chunks.

Reasoning comes back as `reasoning_content` beside `content`, as DeepSeek's API and vLLM return it.
Unknown fields are refused, like OpenAI's own API does; fields we cannot honour are accepted only at
their neutral values, so a client never silently gets something other than what it asked for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from r1serve.runtime.engine.outputs import RequestOutput
from r1serve.runtime.engine.sampling import SamplingParams, SamplingParamsError

from .errors import classify, invalid
from .frontend import Api, Frontend, new_request_id
from .messages import PoolRequest

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "skip_special_tokens", "include_stop_str_in_output")
# Accepted only when they ask for nothing we do not do.
NEUTRAL = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
           "repetition_penalty": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
           "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
           "tools": (None, []), "tool_choice": (None, "none", "auto")}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort", "stream",
           "stream_options", "model", "response_format"}
CHAT_FIELDS = {"messages", "max_tokens", "max_completion_tokens", *SAMPLING_FIELDS, *NEUTRAL, *IGNORED}
COMPLETION_FIELDS = {"prompt", "max_tokens", *SAMPLING_FIELDS, *NEUTRAL, *IGNORED}
RESPONSE_ID_PREFIXES = {"chat": "chatcmpl", "completion": "cmpl"}


@dataclass(frozen=True)
class OpenAIRequest:
    kind: Api  # "chat" | "completion"
    pool: PoolRequest
    fields: Mapping[str, str]  # the engine's field names -> this request's (errors name what the client sent)
    response_id: str
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("body", f"is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    _check_unicode(body, "")
    return body


def _check_unicode(value: Any, path: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer or UTF-8 encoder takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(path or "body", "is not valid Unicode (it holds a lone surrogate escape)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path or "body")
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}[{i}]")


def chat_request(frontend: Frontend, body: Mapping[str, Any]) -> OpenAIRequest:
    _common_checks(frontend, body, CHAT_FIELDS)
    messages = body.get("messages")
    prompt = frontend.encode_chat(_plain_messages(messages), "messages")
    cap = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _request("chat", frontend, body, prompt, cap, {"prompt": "messages", "max_tokens": cap})


def completion_request(frontend: Frontend, body: Mapping[str, Any]) -> OpenAIRequest:
    _common_checks(frontend, body, COMPLETION_FIELDS)
    prompt = _completion_prompt(frontend, body.get("prompt"))
    return _request("completion", frontend, body, prompt, "max_tokens", {"prompt_token_ids": "prompt"})


def _common_checks(frontend: Frontend, body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(key for key in body if key not in allowed)
    if unknown:
        raise invalid(unknown[0], f"unrecognized request argument (supported: {', '.join(sorted(allowed))})")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise invalid(name, f"only {neutral[1]!r} is supported (got {body[name]!r})")
    if not isinstance(body.get("stream", False), bool):
        raise invalid("stream", f"must be true or false (got {body['stream']!r})")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options", f"only {{'include_usage': bool}} is supported (got {options!r})")
    frontend.check_model(body.get("model"))


def _plain_messages(messages: Any) -> Any:
    """OpenAI messages as the chat template wants them: text parts joined, `developer` as `system`."""
    if not isinstance(messages, list):
        return messages
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", "must be an object with role and content")
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = _text_parts(content, f"messages[{i}].content")
        plain.append(message)
    return plain


def _text_parts(parts: list, param: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{param}[{j}]", "only text parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "".join(texts)


def _completion_prompt(frontend: Frontend, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return frontend.encode_text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return frontend.check_token_ids(prompt, "prompt")
    if prompt is None:
        raise invalid("prompt", "is required")
    raise invalid("prompt", "must be a string or a list of token ids (batches of several prompts are not supported)")


def _request(kind: Api, frontend: Frontend, body: Mapping[str, Any], prompt: list[int], cap: str,
             fields: Mapping[str, str]) -> OpenAIRequest:
    """`cap`: the body's field that holds max_tokens; `fields`: the engine's field names -> the body's."""
    data = {name: body[name] for name in SAMPLING_FIELDS if name in body}
    data["max_tokens"] = frontend.max_tokens(kind, body.get(cap), prompt)
    try:
        params = SamplingParams.from_dict(data)
    except SamplingParamsError as exc:
        raise classify(exc, fields=fields) from None
    frontend.check_lengths(prompt, params.max_tokens, fields)
    try:
        params.check_against(frontend.facts.vocab_size)
    except SamplingParamsError as exc:
        raise classify(exc, fields=fields) from None
    response_id = new_request_id(RESPONSE_ID_PREFIXES[kind])
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return OpenAIRequest(kind, PoolRequest(response_id, prompt, params), fields, response_id,
                         bool(body.get("stream", False)), include_usage)


# -- responses ------------------------------------------------------------------------------------

def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


def finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return "length" if out.finish_reason == "length" else "stop"


def full_response(request: OpenAIRequest, model: str, out: RequestOutput) -> dict:
    """The non-streaming response; `out` is the whole generation merged into one output."""
    if request.kind == "chat":
        message = {"role": "assistant", "content": out.content, "reasoning_content": out.reasoning or None}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(out), "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": finish_reason(out), "logprobs": None}
        obj = "text_completion"
    return {"id": request.response_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(out)}


def stream_chunks(request: OpenAIRequest, model: str, out: RequestOutput, first: bool) -> list[dict]:
    """The SSE chunks for one (possibly merged) output: the delta, then on the end the finish and usage."""
    created = int(time.time())
    base = {"id": request.response_id, "created": created, "model": model}
    chunks = []
    if request.kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if out.reasoning:
            delta["reasoning_content"] = out.reasoning
        if out.content:
            delta["content"] = out.content
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason(out), "logprobs": None}
        chunks.append({**base, "object": "chat.completion.chunk", "choices": [choice]})
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": finish_reason(out), "logprobs": None}
        chunks.append({**base, "object": "text_completion", "choices": [choice]})
        kind = "text_completion"
    if request.include_usage:
        for chunk in chunks:
            chunk["usage"] = None
        if out.finished:
            chunks.append({**base, "object": kind, "choices": [], "usage": usage(out)})
    return chunks


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def models_response(model: str, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "r1serve",
                                        "max_model_len": max_model_len}]}
