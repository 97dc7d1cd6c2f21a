"""A request's output pipeline fed real token ids: reasoning split, stop strings, stop tokens."""

from __future__ import annotations

import pytest

from r1serve.runtime.engine.request_state import RequestState
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.engine.sequence import Sequence
from r1serve.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return Tokenizer.from_dir(tiny_checkpoint)


def _run(tok, prompt_ids, output_ids, params=SamplingParams(max_tokens=200), reasoning=True):
    seq = Sequence("r", list(prompt_ids), len(prompt_ids))
    state = RequestState(seq, params, tok, max_model_len=4096, reasoning=reasoning)
    outs = []
    for token in output_ids:
        if state.finished:
            break
        seq.token_ids.append(token)
        outs.append(state.process([token]))
    if not state.finished:
        last = outs[-1]
        state.finish(last, "length")
    return "".join(o.reasoning for o in outs), "".join(o.content for o in outs), outs


def _ids(tok, *parts):
    ids = []
    for part in parts:
        ids += [part] if isinstance(part, int) else tok.encode(part, add_special_tokens=False)
    return ids


def test_thinking_then_answer(tok):
    out = _ids(tok, tok.think_start_id, "Let me think: 2+2.", tok.think_end_id, "\n\nIt is 4.")
    reasoning, content, _ = _run(tok, tok.encode_chat([{"role": "user", "content": "2+2?"}]), out)
    assert reasoning == "Let me think: 2+2." and content == "\n\nIt is 4."


def test_opening_tag_in_the_prompt(tok):
    prompt = tok.encode_chat([{"role": "user", "content": "2+2?"}]) + [tok.think_start_id]
    reasoning, content, _ = _run(tok, prompt, _ids(tok, "Hmm, four.", tok.think_end_id, "4"))
    assert reasoning == "Hmm, four." and content == "4"


def test_reasoning_disabled_puts_everything_in_content(tok):
    out = _ids(tok, tok.think_start_id, "x", tok.think_end_id, "y")
    reasoning, content, _ = _run(tok, [1, 2], out, reasoning=False)
    assert reasoning == "" and content == "<think>x</think>y"


def test_stop_string_across_tokens_cuts_the_content(tok):
    out = _ids(tok, tok.think_end_id, "The answer is 42. END of story")
    params = SamplingParams(max_tokens=200, stop=("END",))
    reasoning, content, outs = _run(tok, [1], out, params)
    assert content == "The answer is 42. " and outs[-1].finish_reason == "stop"


def test_eos_text_never_leaks_even_without_skipping_specials(tok):
    params = SamplingParams(max_tokens=50, skip_special_tokens=False)
    _, content, outs = _run(tok, [1], _ids(tok, tok.think_end_id, "Done.", tok.eos_token_id, "extra"), params)
    assert content == "Done." and outs[-1].finish_reason == "stop"


def test_multibyte_characters_are_never_split(tok):
    out = _ids(tok, tok.think_end_id, "你好，世界 🌍🚀")
    _, content, outs = _run(tok, [1], out)
    assert content == "你好，世界 🌍🚀"
    assert all("\ufffd" not in o.content for o in outs)
