"""Overlapped stepping: a decode step launched from the previous step's tokens still on the device."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams

from .workload import drain as _drain
from .workload import prompts as _prompts
from .workload import tokens as _tokens


def _serve(model, tokenizer, overlap: bool, params: list[SamplingParams], monkeypatch=None,
           max_running: int = 8) -> tuple[dict, LLMEngine, list]:
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8, max_running=max_running,
                                                      overlap=overlap))
    launches: list[tuple[bool, int, bool]] = []  # per forward: from device tokens?, rows, requests waiting?
    if monkeypatch is not None:
        run = engine.runner.run

        def counting(chunks, **kwargs):
            launches.append((kwargs.get("input_ids") is not None, len(chunks), bool(engine.scheduler.waiting)))
            return run(chunks, **kwargs)

        monkeypatch.setattr(engine.runner, "run", counting)
    for i, (prompt, p) in enumerate(zip(_prompts(), params)):
        engine.add_request(f"r{i}", prompt, p)
    outputs: dict = {}
    _drain(engine, outputs)
    return outputs, engine, launches


def test_sequences_that_stop_while_the_next_step_runs_end_exactly_as_step_by_step(model, tokenizer, monkeypatch):
    """A stop token, a seeded sample and different max_tokens end requests at different steps; their
    tokens, texts and finish reasons equal the step-by-step engine's, and the extra step computed for a
    sequence that turned out finished is dropped."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    first, _, _ = _serve(model, tokenizer, False, [greedy] * 4)
    stop_at = _tokens(first["r1"])[4]  # r1 stops at its fifth token, only known once sampled
    params = [
        greedy,
        SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]),
        SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
    ]
    step_by_step, _, _ = _serve(model, tokenizer, False, params)
    overlapped, engine, launches = _serve(model, tokenizer, True, params, monkeypatch)
    assert overlapped.keys() == step_by_step.keys()
    for rid, outs in step_by_step.items():
        got = overlapped[rid]
        assert _tokens(got) == _tokens(outs), rid
        assert "".join(o.text for o in got) == "".join(o.text for o in outs), rid
        assert got[-1].finish_reason == outs[-1].finish_reason and sum(o.finished for o in got) == 1, rid
    assert overlapped["r1"][-1].finish_reason == "stop" and len(_tokens(overlapped["r1"])) == 5
    assert sum(from_device for from_device, _, _ in launches) >= 5, "decode steps were launched from device tokens"
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work


def test_an_abort_while_a_step_runs_drops_that_steps_token(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8, overlap=True))
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(_prompts()[:2]):
        engine.add_request(f"r{i}", prompt, greedy)
    outputs: dict = {}
    for _ in range(4):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert engine._inflight is not None  # a step is on the device now
    aborted = engine.abort("r0")
    assert aborted.finish_reason == "abort"
    _drain(engine, outputs)
    assert all(o.request_id != "r0" for o in engine.step())
    assert len(_tokens(outputs["r1"])) == 10 and outputs["r1"][-1].finish_reason == "length"
    assert not any(o.finished for o in outputs.get("r0", [])), "r0 ended only by its abort"
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work


def test_sequences_ending_at_max_tokens_cost_no_extra_step(model, tokenizer, monkeypatch):
    """When the pending token is a sequence's last by count, the next step leaves it out: overlapped
    stepping computes exactly the rows step-by-step stepping does (only stop tokens cost a dropped row)."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 5, 9, 1)]
    step_by_step, _, plain = _serve(model, tokenizer, False, params, monkeypatch)
    overlapped, _, launches = _serve(model, tokenizer, True, params, monkeypatch)
    assert {r: _tokens(o) for r, o in overlapped.items()} == {r: _tokens(o) for r, o in step_by_step.items()}
    assert sum(rows for _, rows, _ in launches) == sum(rows for _, rows, _ in plain)
    assert any(from_device for from_device, _, _ in launches)


def test_a_full_engine_keeps_overlapping_while_requests_wait(model, tokenizer, monkeypatch):
    """With every running slot taken, waiting requests could not be admitted anyway: decode steps still
    follow each other on the device, and the waiting ones start as slots free up."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 10, 4, 8)]
    step_by_step, _, _ = _serve(model, tokenizer, False, params, max_running=2)
    overlapped, engine, launches = _serve(model, tokenizer, True, params, monkeypatch, max_running=2)
    assert {r: _tokens(o) for r, o in overlapped.items()} == {r: _tokens(o) for r, o in step_by_step.items()}
    assert any(from_device and waiting for from_device, _, waiting in launches)
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("prompt", [[300], list(range(300, 309))], ids=["one token", "one past a cached block"])
def test_a_prefill_engine_hands_off_what_it_would_without_overlap(model, tokenizer, prompt):
    """A prefill step of single-token chunks looks like a decode step, but a prefill engine hands its
    sequences off: no step may follow from their tokens (it would also advance a seeded generator)."""
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=5)
    handoffs = []
    for overlap in (False, True):
        engine = LLMEngine(model, tokenizer, EngineConfig(role="prefill", num_blocks=64, block_size=8,
                                                          overlap=overlap))
        outputs: dict = {}
        engine.add_request("warm", prompt[:8] + [1], SamplingParams(max_tokens=1))  # caches the first block
        _drain(engine, outputs)
        engine.add_request("a", prompt, params)
        _drain(engine, outputs)
        [out] = outputs["a"]
        handoffs.append(out.handoff)
        assert engine.stats().kv_blocks_used == 0
    plain, overlapped = handoffs
    assert overlapped.first_token_id == plain.first_token_id
    assert torch.equal(overlapped.generator_state, plain.generator_state)
    assert torch.equal(overlapped.latents, plain.latents)


def test_hand_offs_joining_a_decode_engine_keep_it_overlapping(model, tokenizer, monkeypatch):
    """A decode pool admits a hand-off between steps; the next step still follows from the device tokens,
    with the newcomer's first token uploaded beside them. Tokens equal the step-by-step decode engine's."""
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.7, seed=9, ignore_eos=True)] * 2
    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", num_blocks=64, block_size=8))
    handoffs = []
    for i, (prompt, p) in enumerate(zip(_prompts()[:4], params)):
        prefill.add_request(f"r{i}", prompt, p)
    outputs: dict = {}
    _drain(prefill, outputs)
    handoffs = [outputs[f"r{i}"][0].handoff for i in range(4)]

    results, joined_launches = [], []
    for overlap in (False, True):
        decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=64, block_size=8,
                                                          overlap=overlap))
        launches: list[tuple[bool, int]] = []
        run = decode.runner.run

        def counting(chunks, launches=launches, run=run, **kwargs):
            launches.append((kwargs.get("input_ids") is not None, len(chunks)))
            return run(chunks, **kwargs)

        monkeypatch.setattr(decode.runner, "run", counting)
        streamed: dict = {}
        for handoff in handoffs:  # one joins every other step
            for out in decode.add_handoff(handoff):
                streamed.setdefault(out.request_id, []).append(out)
            for _ in range(2):
                for out in decode.step():
                    streamed.setdefault(out.request_id, []).append(out)
        _drain(decode, streamed)
        results.append({rid: _tokens(outs) for rid, outs in streamed.items()})
        joined_launches.append(any(from_device and rows > prev_rows for (from_device, rows), (_, prev_rows)
                                   in zip(launches[1:], launches)))
        assert decode.stats().kv_blocks_used == 0
    assert results[0] == results[1] and all(len(t) in (10, 12) for t in results[1].values())
    assert joined_launches == [False, True]
