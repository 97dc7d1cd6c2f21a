"""max_tokens as each API resolves it, and the one rule and wording for prompt plus max_tokens (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.runtime.engine.limits import check_fits
from r1serve.runtime.engine.outputs import RequestError
from r1serve.runtime.serve import grpc_api, openai_api
from r1serve.runtime.serve.errors import ServeError, Status, classify
from r1serve.runtime.serve.frontend import Frontend
from r1serve.spec import parse_r1deployment

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
CONTEXT = 256


@pytest.fixture(scope="module")
def frontend(tiny_checkpoint):
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["model"]["maxModelLen"] = CONTEXT
    return Frontend(parse_r1deployment(doc), Path(tiny_checkpoint))


def _ids(n: int) -> list[int]:
    return list(range(100, 100 + n))


def _grpc(frontend, n: int, **sampling):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=_ids(n)), sampling=pb.SamplingParams(**sampling))
    return grpc_api.prepare(frontend, request)[0].params


def _completion(frontend, n: int, **body):
    return openai_api.completion_request(frontend, {"prompt": _ids(n), **body}).pool.params


def _chat(frontend, **body):
    return openai_api.chat_request(frontend, {"messages": [{"role": "user", "content": "hi"}], **body})


def test_each_api_has_its_own_default_lowered_to_what_the_context_leaves(frontend):
    assert _grpc(frontend, 4).max_tokens == min(256, CONTEXT - 4)
    assert _grpc(frontend, 200).max_tokens == CONTEXT - 200
    assert _completion(frontend, 4).max_tokens == 16
    assert _completion(frontend, CONTEXT - 5).max_tokens == 5
    chat = _chat(frontend)
    assert chat.pool.params.max_tokens == CONTEXT - len(chat.pool.prompt_token_ids)  # the rest of the context
    assert _chat(frontend, max_completion_tokens=7).pool.params.max_tokens == 7
    assert _grpc(frontend, 4, max_tokens=9).max_tokens == _completion(frontend, 4, max_tokens=9).max_tokens == 9


def _refusal(call) -> ServeError:
    with pytest.raises(ServeError) as info:
        call()
    assert info.value.status is Status.INVALID_ARGUMENT
    return info.value


def test_prompt_plus_max_tokens_is_one_rule_in_one_wording_naming_each_apis_field(frontend):
    with pytest.raises(RequestError) as engine:
        check_fits(10, CONTEXT, CONTEXT)
    problem = engine.value.problem
    assert problem == f"the prompt (10 tokens) plus {CONTEXT} tokens to generate is {CONTEXT + 10} tokens, " \
                      f"more than the model's context of {CONTEXT}"
    grpc = _refusal(lambda: _grpc(frontend, 10, max_tokens=CONTEXT))
    completion = _refusal(lambda: _completion(frontend, 10, max_tokens=CONTEXT))
    assert (grpc.param, grpc.message) == ("sampling.max_tokens", f"sampling.max_tokens: {problem}")
    assert (completion.param, completion.message) == ("max_tokens", f"max_tokens: {problem}")
    chat = _refusal(lambda: _chat(frontend, max_completion_tokens=CONTEXT))
    prompt_len = len(_chat(frontend).pool.prompt_token_ids)
    assert (chat.param, chat.message) == ("max_completion_tokens", f"max_completion_tokens: the prompt ({prompt_len} "
                                          f"tokens) plus {CONTEXT} tokens to generate is {prompt_len + CONTEXT} "
                                          f"tokens, more than the model's context of {CONTEXT}")
    assert _refusal(lambda: _chat(frontend, max_tokens=CONTEXT)).param == "max_tokens"
    long_prompt = _refusal(lambda: _completion(frontend, CONTEXT))
    assert long_prompt.message == f"prompt: has {CONTEXT} tokens; the model's context is {CONTEXT}, " \
                                  "leaving no room to generate"


def test_sampling_errors_name_the_field_the_client_sent(frontend):
    assert _refusal(lambda: _grpc(frontend, 4, max_tokens=0)).message.startswith("sampling.max_tokens: must be")
    assert _refusal(lambda: _grpc(frontend, 4, top_p=2.0)).param == "sampling.top_p"
    refused = _refusal(lambda: _chat(frontend, max_completion_tokens=0))
    assert refused.param == "max_completion_tokens" and refused.message.startswith("max_completion_tokens: must be")
    assert _refusal(lambda: _completion(frontend, 4, temperature="hot")).param == "temperature"


def test_an_engine_refusal_from_a_replica_is_named_by_the_clients_api():
    # A replica classifies with the engine's names (it does not know the API); the Ingress renames.
    from_replica = classify(RequestError("max_tokens", "40 tokens need 5 KV blocks; the cache holds 4"))
    assert from_replica.message == "max_tokens: 40 tokens need 5 KV blocks; the cache holds 4"
    renamed = classify(from_replica, fields=grpc_api.FIELDS)
    assert (renamed.param, renamed.message) == ("sampling.max_tokens",
                                               "sampling.max_tokens: 40 tokens need 5 KV blocks; the cache holds 4")
    assert classify(from_replica, fields={"max_tokens": "max_completion_tokens"}).param == "max_completion_tokens"
