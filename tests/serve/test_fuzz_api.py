"""Property-based fuzzing of both request surfaces on the local graph: random, missing, huge and wrongly-typed
fields, invalid UTF-8, prompts past the context and extreme sampling values always get a client error that
names the problem (never INTERNAL / 5xx), and the server keeps serving afterwards."""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1serve.protos.r1serve.v1 import inference_pb2 as pb
from r1serve.protos.r1serve.v1 import inference_pb2_grpc as pb_grpc
from r1serve.runtime.serve import client

pytestmark = pytest.mark.slow
MOCK = {"kind": "mock", "token_delay_s": 0.0}
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLIENT_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}
CLIENT_HTTP = {400, 404, 413, 422}
CONTEXT = 2048  # examples/tiny.yaml maxModelLen
# test -> Counter of answers (HTTP status or gRPC code), for docs/RELIABILITY.md
ANSWERS: dict[str, Counter] = defaultdict(Counter)
PHASE_START = [time.monotonic()]  # reset once each group's graph is deployed


def tally(test: str, answer) -> None:
    ANSWERS[test][str(answer)] += 1

# -- value strategies ------------------------------------------------------------------------------

extreme_ints = st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30])
extreme_floats = st.sampled_from([0.0, -0.0, 1e-45, 1e-300, -1.0, 1.5, 2.0, 1e30, 1e308, math.inf, -math.inf,
                                  math.nan])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), extreme_ints, st.floats(), extreme_floats,
                    st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
huge_text = st.sampled_from(["x" * 100_000, "hello " * 5000, "\u4e2d" * 30_000, "\x00" * 1000])
prompts = st.one_of(json_values, huge_text, st.lists(extreme_ints, min_size=1, max_size=8),
                    st.just(list(range(CONTEXT + 10))))
messages = st.one_of(json_values, st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool", "bogus"]), json_values),
     "content": st.one_of(st.text(max_size=40), huge_text, json_values)}), max_size=3))
SAMPLING = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
            "stop_token_ids", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "n", "logprobs",
            "stream", "stream_options", "model", "logit_bias", "bogus_field"]
sampling_values = st.one_of(json_values, extreme_ints, extreme_floats)


@st.composite
def http_bodies(draw, chat: bool):
    body = {}
    if draw(st.booleans()):
        body["messages" if chat else "prompt"] = draw(messages if chat else prompts)
    for name in draw(st.lists(st.sampled_from(SAMPLING), max_size=4, unique=True)):
        body[name] = draw(sampling_values)
    return body


def raw_bodies():
    """Bytes that are not the JSON the API wants: invalid UTF-8, truncated JSON, non-objects."""
    invalid_utf8 = st.binary(min_size=1, max_size=64).map(lambda b: b'{"prompt": "' + b + b'\xff\xfe"}')
    return st.one_of(st.binary(max_size=256), invalid_utf8, st.sampled_from(
        [b"", b"{", b"[]", b"null", b"42", b'"prompt"', b'{"prompt": "hi"', b'{"prompt": "\\ud800"}',
         b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}']))


# -- checks ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph(cluster, docs):
    cluster.deploy(docs.tiny(), MOCK)
    PHASE_START[0] = time.monotonic()
    return cluster


@pytest.fixture(scope="module")
def http(graph):
    with httpx.Client(base_url=graph.http_url, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def stub(graph):
    with grpc.insecure_channel(graph.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def check_http(response: httpx.Response, test: str = "http") -> None:
    tally(test, response.status_code)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code == 200:
        return
    assert response.status_code in CLIENT_HTTP, response.status_code
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), error


def still_serving(http: httpx.Client, stub) -> None:
    response = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    assert response.status_code == 200, response.text
    request = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=3))
    assert list(stub.Generate(request, metadata=client.METADATA, timeout=30))[-1].finished


@FUZZ
@given(body=http_bodies(chat=False))
def test_http_completions_fuzz(http, body):
    check_http(http.post("/v1/completions", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"}), "http /v1/completions JSON")


@FUZZ
@given(body=http_bodies(chat=True))
def test_http_chat_fuzz(http, body):
    check_http(http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"}), "http /v1/chat/completions JSON")


@FUZZ
@given(raw=raw_bodies(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_http_raw_bytes_fuzz(http, stub, raw, path):
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    check_http(response, "http raw bytes / invalid UTF-8")
    assert response.status_code != 200 or raw.startswith(b"{")


# -- gRPC ------------------------------------------------------------------------------------------

uint32s = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 2**32 - 1, 128_815, 2**31]))
f32 = st.one_of(st.floats(width=32), extreme_floats.filter(lambda x: math.isnan(x) or abs(x) < 3e38 or
                                                           math.isinf(x)))


@st.composite
def grpc_requests(draw):
    request = pb.GenerateRequest()
    which = draw(st.sampled_from(["text", "token_ids", "chat", "none"]))
    if which == "text":
        request.text = draw(st.one_of(st.text(max_size=60), huge_text))
    elif which == "token_ids":
        request.token_ids.ids.extend(draw(st.one_of(st.lists(uint32s, max_size=8),
                                                    st.just(list(range(CONTEXT + 10))))))
    elif which == "chat":
        for role, content in draw(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=40)), max_size=3)):
            request.chat.messages.add(role=role, content=content)
    s = request.sampling
    for name, strategy in (("max_tokens", uint32s), ("temperature", f32), ("top_p", f32),
                           ("top_k", st.integers(-(2**31), 2**31 - 1)), ("min_p", f32),
                           ("seed", st.integers(0, 2**64 - 1)), ("skip_special_tokens", st.booleans())):
        if draw(st.booleans()):
            setattr(s, name, draw(strategy))
    s.stop.extend(draw(st.lists(st.text(max_size=300), max_size=20)))
    s.stop_token_ids.extend(draw(st.lists(uint32s, max_size=4)))
    s.ignore_eos = draw(st.booleans())
    request.model = draw(st.sampled_from(["", "", "tiny", "other-model", "\u00e9" * 300]))
    request.request_id = draw(st.text(max_size=20))
    return request


def check_grpc(call, test: str = "grpc") -> None:
    try:
        call()
    except grpc.RpcError as exc:
        tally(test, exc.code().name)
        assert exc.code() in CLIENT_GRPC, (exc.code(), exc.details())
        assert exc.details() and exc.details().strip()
        return
    tally(test, "OK")


@FUZZ
@given(request=grpc_requests())
def test_grpc_generate_fuzz(stub, request):
    check_grpc(lambda: list(stub.Generate(request, metadata=client.METADATA, timeout=60)), "grpc Generate fields")


@FUZZ
@given(request=grpc_requests())
def test_grpc_unary_fuzz(stub, request):
    check_grpc(lambda: stub.GenerateUnary(request, metadata=client.METADATA, timeout=60), "grpc GenerateUnary fields")


def _field(number: int, wire_type: int) -> bytes:
    return bytes([(number << 3) | wire_type])


def _length_delimited(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return _field(number, 2) + bytes([len(payload)]) + payload


@FUZZ
@given(payload=st.binary(min_size=1, max_size=60).map(lambda b: b + b"\xff"),
       where=st.sampled_from(["text", "model", "request_id", "chat", "stop"]))
def test_grpc_invalid_utf8_in_string_fields(graph, payload, where):
    """A raw serialized GenerateRequest whose string field holds bytes that are not UTF-8."""
    if where == "chat":
        message = _length_delimited(3, _length_delimited(1, _length_delimited(2, payload)))
    elif where == "stop":
        message = _length_delimited(1, b"hi") + _length_delimited(4, _length_delimited(7, payload))
    else:
        message = _length_delimited({"text": 1, "request_id": 5, "model": 6}[where], payload)
    with grpc.insecure_channel(graph.grpc_target) as channel:
        call = channel.unary_stream("/r1serve.v1.Inference/Generate", request_serializer=None,
                                    response_deserializer=pb.GenerateResponse.FromString)
        check_grpc(lambda: list(call(message, metadata=client.METADATA, timeout=60)), "grpc invalid UTF-8 strings")


@FUZZ
@given(raw=st.binary(max_size=128))
def test_grpc_random_bytes_as_a_request(graph, raw):
    with grpc.insecure_channel(graph.grpc_target) as channel:
        call = channel.unary_stream("/r1serve.v1.Inference/Generate", request_serializer=None,
                                    response_deserializer=pb.GenerateResponse.FromString)
        check_grpc(lambda: list(call(raw, metadata=client.METADATA, timeout=60)), "grpc random bytes")


def test_server_keeps_serving_after_fuzzing(http, stub, reliability):
    still_serving(http, stub)
    record(reliability, "fuzz-api-mock", "request surfaces, mock engine (60 examples per surface)")


def record(reliability, name: str, what: str) -> None:
    answers = Counter()
    for counts in ANSWERS.values():
        answers.update(counts)
    summary = ", ".join(f"{answer}×{n}" for answer, n in sorted(answers.items()))
    surfaces = "; ".join(sorted(ANSWERS))
    reliability(name, "bad-input", what=f"{what}: {surfaces}; answers {summary}; then a normal request succeeds",
                requests=sum(answers.values()), failed=0, failures="none internal (every error a 4xx / "
                "INVALID_ARGUMENT or NOT_FOUND naming the field)", duration_s=time.monotonic() - PHASE_START[0])
    ANSWERS.clear()


# -- a few examples against the real tiny engine: extreme sampling values reach real sampling code -------

@st.composite
def extreme_sampling(draw):
    s = pb.SamplingParams(max_tokens=draw(st.integers(1, 4)))
    for name, choices in (("temperature", [0.0, 1e-45, 1e-6, 1.0, 2.0, 1e30, math.inf, math.nan]),
                          ("top_p", [1e-45, 1e-6, 0.5, 1.0, math.nan, 2.0]),
                          ("top_k", [-1, 0, 1, 50, 2**31 - 1, -5]),
                          ("min_p", [0.0, 1e-6, 1.0, math.nan, -0.5]),
                          ("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])):
        if draw(st.booleans()):
            setattr(s, name, draw(st.sampled_from(choices)))
    s.stop_token_ids.extend(draw(st.lists(st.sampled_from([0, 1, 128_814, 128_815, 2**32 - 1]), max_size=2)))
    s.ignore_eos = draw(st.booleans())
    return s


@pytest.fixture(scope="module")
def real_stub(cluster, docs):
    cluster.deploy(docs.tiny())
    PHASE_START[0] = time.monotonic()
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        yield pb_grpc.InferenceStub(channel)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(sampling=extreme_sampling(), which=st.sampled_from(["text", "ids", "chat"]))
def test_real_engine_extreme_sampling(real_stub, sampling, which):
    request = pb.GenerateRequest(sampling=sampling)
    if which == "text":
        request.text = "The capital of France is"
    elif which == "ids":
        request.token_ids.ids.extend([1000, 2000, 3000])
    else:
        request.chat.messages.add(role="user", content="hi")
    try:
        out = list(real_stub.Generate(request, metadata=client.METADATA, timeout=120))
    except grpc.RpcError as exc:
        tally("grpc extreme sampling (real engine)", exc.code().name)
        assert exc.code() in CLIENT_GRPC, (exc.code(), exc.details())
        assert exc.details().strip()
        return
    tally("grpc extreme sampling (real engine)", "OK")
    assert out[-1].finished and 1 <= out[-1].usage.completion_tokens <= sampling.max_tokens


def test_real_engine_keeps_serving(real_stub, cluster, reliability):
    request = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=3, temperature=0))
    assert list(real_stub.Generate(request, metadata=client.METADATA, timeout=120))[-1].finished
    response = httpx.post(cluster.http_url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=120)
    assert response.status_code == 200, response.text
    record(reliability, "fuzz-api-real", "extreme sampling values on the real tiny engine (25 examples)")
