"""Every bad request gets the right status and a message naming the field, over gRPC and HTTP (mock engine)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MOCK = {"kind": "mock", "token_delay_s": 0.02}
LONG = list(range(1000, 3100))  # more tokens than the tiny spec's maxModelLen (2048)


def S(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**fields)


GRPC_CASES = [
    (pb.GenerateRequest(sampling=S(max_tokens=4)), "INVALID_ARGUMENT", "prompt"),
    (pb.GenerateRequest(text=""), "INVALID_ARGUMENT", "prompt.text"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "INVALID_ARGUMENT", "prompt.token_ids.ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 999999])), "INVALID_ARGUMENT", "prompt.token_ids.ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=LONG)), "INVALID_ARGUMENT", "prompt"),
    (pb.GenerateRequest(chat=pb.Chat()), "INVALID_ARGUMENT", "prompt.chat.messages"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])),
     "INVALID_ARGUMENT", "prompt.chat.messages"),
    (pb.GenerateRequest(text="hi", sampling=S(max_tokens=0)), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (pb.GenerateRequest(text="hi", sampling=S(max_tokens=5000)), "INVALID_ARGUMENT", "sampling.max_tokens"),
    (pb.GenerateRequest(text="hi", sampling=S(temperature=-1)), "INVALID_ARGUMENT", "sampling.temperature"),
    (pb.GenerateRequest(text="hi", sampling=S(temperature=1000)), "INVALID_ARGUMENT", "sampling.temperature"),
    (pb.GenerateRequest(text="hi", sampling=S(top_p=0)), "INVALID_ARGUMENT", "sampling.top_p"),
    (pb.GenerateRequest(text="hi", sampling=S(top_p=1.5)), "INVALID_ARGUMENT", "sampling.top_p"),
    (pb.GenerateRequest(text="hi", sampling=S(top_k=-2)), "INVALID_ARGUMENT", "sampling.top_k"),
    (pb.GenerateRequest(text="hi", sampling=S(min_p=2)), "INVALID_ARGUMENT", "sampling.min_p"),
    (pb.GenerateRequest(text="hi", sampling=S(seed=2**63)), "INVALID_ARGUMENT", "sampling.seed"),
    (pb.GenerateRequest(text="hi", sampling=S(stop=["x"] * 17)), "INVALID_ARGUMENT", "sampling.stop"),
    (pb.GenerateRequest(text="hi", sampling=S(stop=[""])), "INVALID_ARGUMENT", "sampling.stop"),
    (pb.GenerateRequest(text="hi", sampling=S(stop_token_ids=[999999])), "INVALID_ARGUMENT",
     "sampling.stop_token_ids"),
    (pb.GenerateRequest(text="hi", model="gpt-4"), "NOT_FOUND", "model"),
]

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
HTTP_CASES = [
    ("chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 5000}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {**CHAT, "top_p": 2}, 400, "top_p"),
    ("chat/completions", {**CHAT, "top_k": -5}, 400, "top_k"),
    ("chat/completions", {**CHAT, "min_p": -0.5}, 400, "min_p"),
    ("chat/completions", {**CHAT, "seed": -1}, 400, "seed"),
    ("chat/completions", {**CHAT, "stop": 3}, 400, "stop"),
    ("chat/completions", {**CHAT, "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("chat/completions", {**CHAT, "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("chat/completions", {**CHAT, "n": 2}, 400, "n"),
    ("chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("chat/completions", {**CHAT, "stream_options": {"x": 1}}, 400, "stream_options"),
    ("chat/completions", {**CHAT, "frobnicate": 1}, 400, "frobnicate"),
    ("chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [5, 999999]}, 400, "prompt"),
    ("completions", {"prompt": LONG}, 400, "prompt"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
]


@pytest.fixture(scope="module")
def graph(cluster, docs):
    cluster.deploy(docs.limited(), MOCK)
    return cluster


@pytest.fixture(scope="module")
def stub(graph):
    with grpc.insecure_channel(graph.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.mark.parametrize("request_,code,field", GRPC_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(GRPC_CASES)])
def test_grpc_bad_request(stub, request_, code, field):
    for call in (lambda: list(stub.Generate(request_, timeout=30)), lambda: stub.GenerateUnary(request_, timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code().name == code
        assert info.value.details().startswith(f"{field}:"), info.value.details()


@pytest.mark.parametrize("path,body,status,param", HTTP_CASES, ids=[f"{c[3]}-{i}" for i, c in enumerate(HTTP_CASES)])
def test_http_bad_request(graph, path, body, status, param):
    for stream in (False, True):
        sent = {**body, "stream": stream} if "stream" not in body else body
        response = httpx.post(f"{graph.http_url}/v1/{path}", json=sent, timeout=30)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}:"), error
        assert set(error) == {"message", "type", "param", "code"}


def test_http_body_that_is_not_json(graph):
    response = httpx.post(f"{graph.http_url}/v1/completions", content=b"{nope", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"
