"""A request resumed after tokens its client already has (its replica was lost) continues exactly as the
undisturbed run: the same tokens, and text, reasoning and content that join up without a gap or a repeat,
in one engine and across a prefill-to-decode hand-off."""

from __future__ import annotations

import pytest

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.outputs import RequestError
from r1serve.runtime.engine.sampling import SamplingParams

from .workload import drain

PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
CONFIG = EngineConfig(num_blocks=128, block_size=8)


def _fields(outs) -> tuple[list[int], str, str, str]:
    return ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
            "".join(o.reasoning for o in outs), "".join(o.content for o in outs))


def _join(before, after) -> tuple[list[int], str, str, str]:
    return tuple(a + b for a, b in zip(_fields(before), _fields(after)))


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    # The chat template opens <think>: the run starts in the reasoning and may leave it part-way.
    return tokenizer.encode_chat([{"role": "user", "content": "Is 17 a prime number? Say why."}])


@pytest.fixture(scope="module")
def undisturbed(model, tokenizer, chat_prompt):
    engine = LLMEngine(model, tokenizer, CONFIG)
    engine.add_request("r", chat_prompt, PARAMS)
    outputs: dict = {}
    drain(engine, outputs)
    return outputs["r"]  # one output per token


@pytest.mark.parametrize("cut", [1, 7, 23, 39])
def test_a_resumed_request_continues_as_the_undisturbed_run(model, tokenizer, chat_prompt, undisturbed, cut):
    sent = [t for o in undisturbed[:cut] for t in o.token_ids]
    engine = LLMEngine(model, tokenizer, CONFIG)
    engine.add_request("r~1", chat_prompt, PARAMS, resumed=sent)
    outputs: dict = {}
    drain(engine, outputs)
    resumed = outputs["r~1"]
    assert _fields(undisturbed)[2], "the run should start in the reasoning"
    assert _join(undisturbed[:cut], resumed) == _fields(undisturbed)
    assert resumed[-1].completion_tokens == PARAMS.max_tokens and resumed[-1].prompt_tokens == len(chat_prompt)
    assert engine.blocks.num_free_blocks == CONFIG.num_blocks


@pytest.mark.parametrize("cut", [1, 16])
def test_a_resumed_request_continues_across_a_hand_off(model, tokenizer, chat_prompt, undisturbed, cut):
    sent = [t for o in undisturbed[:cut] for t in o.token_ids]
    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", num_blocks=128, block_size=8))
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=128, block_size=8))
    prefill.add_request("r~1", chat_prompt, PARAMS, resumed=sent)
    prefilled: dict = {}
    drain(prefill, prefilled)
    handoff = prefilled["r~1"][-1].handoff
    assert handoff.resumed_token_ids == sent and handoff.latents.shape[1] == len(chat_prompt) + cut
    outputs: dict = {"r~1": decode.add_handoff(handoff)}
    drain(decode, outputs)
    assert _join(undisturbed[:cut], outputs["r~1"]) == _fields(undisturbed)
    assert decode.blocks.num_free_blocks == prefill.blocks.num_free_blocks == 128


def test_a_resumption_that_leaves_nothing_to_generate_is_refused(model, tokenizer, chat_prompt, undisturbed):
    engine = LLMEngine(model, tokenizer, CONFIG)
    sent = [t for o in undisturbed for t in o.token_ids]
    with pytest.raises(RequestError, match=r"resumed_token_ids: 40 tokens already sent leave nothing of max_tokens"):
        engine.add_request("r~1", chat_prompt, PARAMS, resumed=sent)
    assert not engine.has_work


def test_a_decode_engine_continues_a_request_whose_rank_was_lost_by_computing_it_again(model, tokenizer,
                                                                                      chat_prompt, undisturbed):
    """A decode rank that takes over a lost rank's request has no latents for it: it computes the prompt and the
    streamed tokens again. New prompts it still refuses: they come as hand-offs."""
    sent = [t for o in undisturbed[:9] for t in o.token_ids]
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=128, block_size=8))
    with pytest.raises(RequestError, match="a decode engine takes hand-offs"):
        decode.add_request("new", chat_prompt, PARAMS)
    decode.add_request("r~1", chat_prompt, PARAMS, resumed=sent)
    outputs: dict = {}
    drain(decode, outputs)
    assert _join(undisturbed[:9], outputs["r~1"]) == _fields(undisturbed)


def test_a_seeded_request_continues_its_draws_from_the_generator_state_it_reported(model, tokenizer, chat_prompt):
    seeded = SamplingParams(max_tokens=30, temperature=0.9, seed=5, ignore_eos=True)
    config = EngineConfig(num_blocks=128, block_size=8, report_generator_state=True)
    engine = LLMEngine(model, tokenizer, config)
    engine.add_request("r", chat_prompt, seeded)
    outputs: dict = {}
    drain(engine, outputs)
    whole = outputs["r"]
    assert all(o.generator_state is not None for o in whole)  # each output says where the draws stand
    cut = 12
    sent = [t for o in whole[:cut] for t in o.token_ids]
    again = LLMEngine(model, tokenizer, config)
    again.add_request("r~1", chat_prompt, seeded, resumed=sent, generator_state=whole[cut - 1].generator_state)
    resumed: dict = {}
    drain(again, resumed)
    assert sent + [t for o in resumed["r~1"] for t in o.token_ids] == [t for o in whole for t in o.token_ids]
