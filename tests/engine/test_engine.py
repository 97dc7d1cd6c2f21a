"""The engine against the reference model: continuous batching, prefix reuse, preemption, roles."""

from __future__ import annotations

import functools

import pytest

import r1serve.runtime.engine.engine as config_module
from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.outputs import RequestError
from r1serve.runtime.engine.sampling import SamplingParams

from .workload import GREEDY
from .workload import drain as _drain
from .workload import prompts as _prompts
from .workload import tokens as _tokens


@pytest.fixture(autouse=True, params=[False, True], ids=["step by step", "overlapped"])
def overlap(request, monkeypatch):
    """Every test runs twice: each step's tokens read back in that step, and (what CUDA engines do) one
    call later, with the next decode step launched from the tokens still on the device."""
    monkeypatch.setitem(globals(), "EngineConfig", functools.partial(config_module.EngineConfig,
                                                                      overlap=request.param))
    return request.param


def test_concurrent_requests_match_the_reference_alone(model, tokenizer, expected):
    """Mixed lengths, late joiners, shared prefixes and a cache too small for all: same greedy tokens."""
    config = EngineConfig(num_blocks=30, block_size=8, max_batch_tokens=48, max_running=6)
    engine = LLMEngine(model, tokenizer, config)
    prompts, outputs, saw_waiting = _prompts(), {}, False
    for i, p in enumerate(prompts[:5]):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(4):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for i, p in enumerate(prompts[5:], start=5):  # join while others are mid-prefill and mid-decode
        engine.add_request(f"r{i}", p, GREEDY)
    while engine.has_work:
        saw_waiting |= engine.stats().waiting > 0 and engine.stats().running > 0
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for i, want in enumerate(expected):
        assert _tokens(outputs[f"r{i}"]) == want, f"request r{i}"
        assert outputs[f"r{i}"][-1].finish_reason == "length"
    stats = engine.stats()
    assert saw_waiting and stats.preemptions > 0 and stats.prefix_hit_tokens > 0
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


def test_prefix_reuse_skips_prefill_work_and_changes_nothing(model, tokenizer, expected, monkeypatch):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8))
    prompts, outputs = _prompts(), {}
    engine.add_request("first", prompts[8], GREEDY)
    _drain(engine, outputs)
    prefilled = []
    run = engine.runner.run

    def counting(chunks, **kwargs):
        prefilled.extend(c.num_tokens for c in chunks if c.seq.num_computed_tokens < c.seq.prompt_len)
        return run(chunks, **kwargs)

    monkeypatch.setattr(engine.runner, "run", counting)
    engine.add_request("second", prompts[10], GREEDY)
    _drain(engine, outputs)
    assert outputs["second"][0].cached_tokens == 40
    assert prefilled == [len(prompts[10]) - 40]  # only the new tail ran
    assert _tokens(outputs["second"]) == expected[10]


def test_prefill_handoff_decode_equals_the_combined_engine(model, tokenizer):
    prompts = _prompts()[:6]
    params = [GREEDY, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)] * 3
    combined, split = {}, {}
    both = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8))
    for i, (p, sp) in enumerate(zip(prompts, params)):
        both.add_request(f"r{i}", p, sp)
    _drain(both, combined)

    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", num_blocks=64, block_size=8))
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=64, block_size=8))
    for i, (p, sp) in enumerate(zip(prompts, params)):
        prefill.add_request(f"r{i}", p, sp)
    handoffs = {}
    _drain(prefill, handoffs)
    assert prefill.stats().kv_blocks_used == 0
    for rid, outs in handoffs.items():
        [out] = outs
        assert out.handoff is not None and out.handoff.latents.shape[1] == len(out.handoff.prompt_token_ids)
        for o in decode.add_handoff(out.handoff):
            split.setdefault(rid, []).append(o)
    _drain(decode, split)
    for rid in combined:
        assert _tokens(split[rid]) == _tokens(combined[rid]), rid
        assert "".join(o.text for o in split[rid]) == "".join(o.text for o in combined[rid])
    assert decode.stats().kv_blocks_used == 0


def test_a_hand_off_without_the_prefix_its_decode_engine_holds_gives_the_same_tokens(model, tokenizer, expected):
    """Rank to rank, the latents of a prefix the decode engine's cache already holds are not sent; if that
    prefix left the cache before the hand-off is admitted, the sequence is computed again instead."""
    prompts, config = _prompts(), dict(num_blocks=64, block_size=8)
    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", **config))
    prefill.add_request("first", prompts[8], GREEDY)
    prefill.add_request("second", prompts[10], GREEDY)
    handoffs = {}
    _drain(prefill, handoffs)
    decode, outputs = LLMEngine(model, tokenizer, EngineConfig(role="decode", **config)), {}
    for o in decode.add_handoff(handoffs["first"][0].handoff):
        outputs.setdefault("first", []).append(o)
    _drain(decode, outputs)
    second = handoffs["second"][0].handoff
    start = decode.cached_prefix_tokens(second.sequence_token_ids)
    assert start == 40  # prompts 8 and 10 share 40 tokens: five blocks
    second.latents, second.latents_start = second.latents[:, start:], start
    for o in decode.add_handoff(second):
        outputs.setdefault("second", []).append(o)
    _drain(decode, outputs)
    assert _tokens(outputs["second"]) == expected[10] and decode.stats().handoff_tokens_not_sent == 40
    elsewhere, again = LLMEngine(model, tokenizer, EngineConfig(role="decode", **config)), {}
    second.request_id = "again"  # a decode engine that does not hold the prefix (evicted meanwhile)
    for o in elsewhere.add_handoff(second):
        again.setdefault("again", []).append(o)
    _drain(elsewhere, again)
    assert _tokens(again["again"]) == expected[10]
    assert decode.stats().kv_blocks_used == elsewhere.stats().kv_blocks_used == 0


def _run_one(engine, rid, prompt, params):
    outputs = {}
    engine.add_request(rid, prompt, params)
    _drain(engine, outputs)
    return _tokens(outputs[rid])


def test_seeded_sampling_is_reproducible_and_seed_dependent(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8))
    prompt = _prompts()[2]
    sampled = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)  # noqa: E731
    a = _run_one(engine, "a", prompt, sampled(1))
    engine.add_request("noise", _prompts()[3], SamplingParams(max_tokens=8, temperature=1.0))
    b = _run_one(engine, "b", prompt, sampled(1))  # other traffic in the batch changes nothing
    c = _run_one(engine, "c", prompt, sampled(2))
    assert a == b and a != c


def test_abort_frees_blocks_at_once(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8, max_batch_tokens=32))
    prompts = _prompts()
    engine.add_request("decoding", prompts[0], GREEDY)
    engine.add_request("prefilling", prompts[1], GREEDY)
    engine.add_request("waiting", prompts[3], GREEDY)
    engine.step()
    engine.step()
    used = engine.stats().kv_blocks_used
    out = engine.abort("prefilling")
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats().kv_blocks_used < used
    assert engine.abort("decoding").finish_reason == "abort"
    assert engine.abort("waiting").finish_reason == "abort"
    assert engine.abort("unknown") is None
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work


def test_a_failing_step_frees_every_block(model, tokenizer, monkeypatch):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8))
    for i, p in enumerate(_prompts()[:4]):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()

    def broken(chunks, **_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", broken)
    with pytest.raises(RuntimeError):
        engine.step()
    outs = engine.fail_all("device lost")
    assert {o.finish_reason for o in outs} == {"error"} and len(outs) == 4
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work


def test_streamed_text_is_the_decoded_output(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8, reasoning=False))
    outputs = {}
    engine.add_request("r", tokenizer.encode_chat([{"role": "user", "content": "Hi!"}]), GREEDY)
    _drain(engine, outputs)
    tokens = _tokens(outputs["r"])
    assert "".join(o.content for o in outputs["r"]) == tokenizer.decode(tokens, skip_special_tokens=True)
    last = outputs["r"][-1]
    assert last.prompt_tokens > 0 and last.completion_tokens == GREEDY.max_tokens


@pytest.mark.parametrize(
    "kwargs,field,fragment",
    [
        (dict(prompt=[]), "prompt", "is empty"),
        (dict(prompt=[1, 200_000]), "prompt_token_ids", "[0, 129280)"),
        (dict(prompt=[1, -1]), "prompt_token_ids", "got -1"),
        (dict(prompt=[1] * 5000), "prompt", "has 5000 tokens; the model's context is 4096"),
        (dict(prompt=[1] * 4090), "max_tokens", "more than the model's context of 4096"),
        (dict(params=SamplingParams(max_tokens=4094)), "max_tokens", "plus 4094 tokens to generate"),
        (dict(params=SamplingParams(stop_token_ids=(129_280,))), "stop_token_ids", "129280"),
        (dict(request_id=""), "request_id", "non-empty"),
    ],
)
def test_bad_requests_name_the_problem(model, tokenizer, kwargs, field, fragment):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=512, block_size=8))
    args = dict(request_id="r", prompt=[1, 2, 3], params=SamplingParams(max_tokens=8)) | kwargs
    with pytest.raises(ValueError) as info:
        engine.add_request(args["request_id"], args["prompt"], args["params"])
    assert str(info.value).startswith(field) and fragment in str(info.value)
    assert not engine.has_work


def test_a_request_larger_than_the_cache_is_refused_up_front(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=4, block_size=8))
    with pytest.raises(RequestError, match="need 5 KV blocks; the cache holds 4"):
        engine.add_request("r", list(range(30)), SamplingParams(max_tokens=8))
    engine.add_request("dup", [1], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="already running"):
        engine.add_request("dup", [1], SamplingParams(max_tokens=2))
