"""The Ingress retries a request whose replica failed: before its first output as it was, after it resumed
after the tokens its client has (when the continuation is well defined), never for a client error."""

from __future__ import annotations

import asyncio

import pytest
from ray import exceptions as ray_errors

from r1serve.runtime.engine.async_engine import EngineDeadError
from r1serve.runtime.engine.outputs import RequestOutput
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.group import GroupFailedError
from r1serve.runtime.serve import pipeline as pipeline_module
from r1serve.runtime.serve.errors import EngineFailure, ServeError, Status, classify
from r1serve.runtime.serve.messages import PoolRequest, to_wire
from r1serve.runtime.serve.pipeline import Pipeline


class _Timer:
    def tokens(self, *_):
        pass

    def finish(self, status):
        self.status = status


class _Metrics:
    def request(self):
        return _Timer()


class _Response:
    def __init__(self, script):
        self.script = script

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for step in self.script:
            if isinstance(step, BaseException):
                raise step
            yield to_wire(step)

    def cancel(self):
        pass


class _Decode:
    """A decode handle whose calls follow `scripts` in turn (outputs, then maybe an exception)."""

    def __init__(self, *scripts):
        self.scripts, self.calls, self.requests = list(scripts), 0, []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request):
        self.calls += 1
        self.requests.append(request)
        return _Response(self.scripts.pop(0))


def _out(tokens, finished=False):
    return RequestOutput("r", token_ids=tokens, finished=finished, finish_reason="length" if finished else None)


def _dead():
    return ray_errors.ActorDiedError()


GREEDY = SamplingParams(max_tokens=8, temperature=0)


async def _collect(decode, params=GREEDY):
    pipeline = Pipeline(decode, None, _Metrics())
    request = PoolRequest("r", [1, 2, 3], params)
    return [out async for out in pipeline.stream(request)]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(pipeline_module, "RETRY_BACKOFF_S", 0.0)


def test_failure_before_the_first_output_is_retried():
    decode = _Decode([_dead()], [_out([5]), _out([6], finished=True)])
    outs = asyncio.run(_collect(decode))
    assert decode.calls == 2 and [t for o in outs for t in o.token_ids] == [5, 6]


def test_failure_after_output_resumes_after_the_tokens_the_client_has():
    decode = _Decode([_out([5]), _out([6, 7]), _dead()], [_out([8]), _out([9], finished=True)])
    outs = asyncio.run(_collect(decode))
    assert [t for o in outs for t in o.token_ids] == [5, 6, 7, 8, 9]  # nothing repeated, nothing lost
    first, resumed = decode.requests
    assert first.resumed_token_ids == () and resumed.resumed_token_ids == (5, 6, 7)
    assert resumed.prompt_token_ids == first.prompt_token_ids and resumed.request_id != first.request_id


@pytest.mark.parametrize("params,resumes", [
    (SamplingParams(max_tokens=8, temperature=0, seed=3), True),  # greedy: the seed draws nothing
    (SamplingParams(max_tokens=8, temperature=0.7), True),  # unseeded: any continuation is a fair draw
    (SamplingParams(max_tokens=8, temperature=0.7, seed=3), False),  # its generator went with the replica
])
def test_only_a_well_defined_continuation_is_resumed(params, resumes):
    decode = _Decode([_out([5]), _dead()], [_out([9], finished=True)])
    if resumes:
        assert [t for o in asyncio.run(_collect(decode, params)) for t in o.token_ids] == [5, 9]
        return
    with pytest.raises(ServeError) as info:
        asyncio.run(_collect(decode, params))
    assert info.value.status is Status.UNAVAILABLE and decode.calls == 1


def test_client_errors_are_not_retried_and_retries_are_bounded():
    decode = _Decode([ServeError(Status.INVALID_ARGUMENT, "x: bad", "x")], [_out([1], finished=True)])
    with pytest.raises(ServeError) as info:
        asyncio.run(_collect(decode))
    assert info.value.status is Status.INVALID_ARGUMENT and decode.calls == 1
    attempts = pipeline_module.RETRIES + 1
    decode = _Decode(*([_dead()] for _ in range(attempts)), [_out([1], finished=True)])
    with pytest.raises(ServeError) as info:
        asyncio.run(_collect(decode))
    assert info.value.status is Status.UNAVAILABLE and decode.calls == attempts


@pytest.mark.parametrize("failure", [
    GroupFailedError("the expert-parallel group is down: rank 1 died"),
    EngineDeadError("the engine is not running: RuntimeError('device lost')"),
    EngineFailure("the decode engine stopped"),
], ids=["expert-parallel group down", "engine dead", "replica engine failed"])
def test_a_replica_whose_engine_is_down_is_unavailable_and_retried(failure):
    """A new request that reaches a replica whose engine (or expert-parallel group) already failed is
    UNAVAILABLE, not INTERNAL, so the Ingress retries it on another replica."""
    assert classify(failure).status is Status.UNAVAILABLE
    wrapped = ray_errors.RayTaskError("generate", "traceback", failure)  # as it arrives from the replica
    assert classify(wrapped).status is Status.UNAVAILABLE
    decode = _Decode([failure], [_out([5]), _out([6], finished=True)])
    outs = asyncio.run(_collect(decode))
    assert decode.calls == 2 and [t for o in outs for t in o.token_ids] == [5, 6]
