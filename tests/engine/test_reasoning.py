"""ReasoningParser: vLLM deepseek_r1 semantics, streamed token by token and in chunks, exact at </think>."""

from __future__ import annotations

import random

import pytest

from r1serve.runtime.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from r1serve.runtime.engine.reasoning import ReasoningParser, reasoning_ended
from r1serve.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def r1_prompt(tok) -> list[int]:
    """A prompt as R1's chat template renders it: it ends by opening the reasoning."""
    return tok.encode_chat([{"role": "user", "content": "What is 6 x 7?"}]) + tok.encode("<think>\n")


def run(tok, prompt, output, sizes=None, *, skip=True, enabled=True):
    """Stream ``output`` the way the engine must: chunks() -> detokenizer -> parser; flush at the end."""
    parser = ReasoningParser.for_tokenizer(tok, prompt, enabled=enabled)
    detok = IncrementalDetokenizer(tok, prompt, skip)
    reasoning, content, start = [], [], 0
    for size in sizes or [1] * len(output):
        for chunk in parser.chunks(output[start : start + size]):
            r, c = parser.push(chunk, detok.push(chunk))
            reasoning.append(r)
            content.append(c)
        start += size
    r, c = parser.push([], detok.flush())
    return "".join(reasoning + [r]), "".join(content + [c]), parser


def final(tok, prompt, output, *, skip=True, enabled=True):
    parser = ReasoningParser.for_tokenizer(tok, prompt, enabled=enabled)
    return parser.split_final(output, lambda ids: tok.decode(ids, skip_special_tokens=skip))


def test_think_tags_are_added_but_not_special(tok):
    ids = [tok.think_start_id, tok.think_end_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think></think>"


def test_r1_prompt_then_reasoning_then_answer(tok, r1_prompt):
    output = tok.encode("Six sevens.\n</think>\n\nThe answer is 42.") + [tok.eos_token_id]
    reasoning, content, parser = run(tok, r1_prompt, output)
    assert (reasoning, content) == ("Six sevens.\n", "\n\nThe answer is 42.")
    assert parser.reasoning_done and not parser.in_reasoning
    assert final(tok, r1_prompt, output) == ("Six sevens.\n", "\n\nThe answer is 42.")


def test_end_tag_without_any_start_tag(tok):
    output = tok.encode("plan</think>answer")
    assert run(tok, tok.encode("Q:"), output)[:2] == ("plan", "answer")
    assert final(tok, [], output) == ("plan", "answer")


def test_generated_start_tag_is_dropped(tok):
    output = tok.encode("<think>\nhmm</think>ok")
    assert output[0] == tok.think_start_id
    assert run(tok, [], output)[:2] == ("\nhmm", "ok")
    assert final(tok, [], output) == ("\nhmm", "ok")


def test_no_end_tag_means_all_reasoning(tok, r1_prompt):
    output = tok.encode("still thinking about 😀")
    reasoning, content, parser = run(tok, r1_prompt, output)
    assert (reasoning, content) == ("still thinking about 😀", "")
    assert not parser.reasoning_done
    assert final(tok, r1_prompt, output) == ("still thinking about 😀", None)
    assert final(tok, r1_prompt, []) == ("", None)


def test_after_end_tag_everything_is_content(tok):
    output = tok.encode("a</think>b<think>c</think>d")
    assert run(tok, [], output)[:2] == ("a", "b<think>c</think>d")
    assert final(tok, [], output) == ("a", "b<think>c</think>d")


def test_prompt_with_thinking_disabled_makes_all_content(tok):
    prompt = tok.encode_chat([{"role": "user", "content": "hi"}]) + tok.encode("<think>\n\n</think>\n\n")
    assert reasoning_ended(prompt, tok.think_start_id, tok.think_end_id)
    output = tok.encode("Hello</think> there")
    assert run(tok, prompt, output)[:2] == ("", "Hello</think> there")
    assert final(tok, prompt, output) == (None, "Hello</think> there")
    assert final(tok, prompt, []) == (None, "")


def test_reasoning_ended_looks_at_the_last_tag(tok):
    start, end = tok.think_start_id, tok.think_end_id
    assert not reasoning_ended([], start, end)
    assert not reasoning_ended([5, start], start, end)
    assert reasoning_ended([start, 5, end, 6], start, end)
    assert not reasoning_ended([start, end, 5, start, 6], start, end)


def test_disabled_parser_passes_everything_to_content(tok):
    output = tok.encode("<think>x</think>y")
    assert run(tok, [], output, enabled=False)[:2] == ("", "<think>x</think>y")
    assert final(tok, [], output, enabled=False) == (None, "<think>x</think>y")


def test_end_tag_spelled_with_ordinary_tokens_is_not_the_boundary(tok):
    spelled = tok.encode("a </") + tok.encode("think") + tok.encode(">")
    assert tok.think_end_id not in spelled and tok.decode(spelled) == "a </think>"
    output = spelled + [tok.think_end_id] + tok.encode("b")
    assert run(tok, [], output)[:2] == ("a </think>", "b")


def test_empty_fields_follow_vllm(tok):
    assert final(tok, [], [tok.think_end_id]) == ("", None)
    assert final(tok, [], [tok.think_end_id, *tok.encode("x")]) == ("", "x")
    assert final(tok, [], [*tok.encode("x"), tok.think_end_id, tok.eos_token_id]) == ("x", None)


def test_characters_split_around_the_boundary(tok):
    first, second = tok.encode("😀")
    whole = tok.encode("🚀")
    output = [first, second, tok.think_end_id, *whole]
    assert run(tok, [], output)[:2] == ("😀", "🚀")
    # A character broken by the tag stays broken on both sides and nothing moves across.
    broken = [first, tok.think_end_id, second, *tok.encode("ok")]
    reasoning, content, _ = run(tok, [], broken)
    assert reasoning == REPLACEMENT_CHAR and content == tok.decode([second, *tok.encode("ok")])
    assert final(tok, [], broken) == (reasoning, content)


def test_tag_text_absent_when_the_detokenizer_skips_it():
    """A tokenizer whose think tags are special: the text of a tag chunk lacks the tag."""
    parser = ReasoningParser(900, 901, [])
    assert parser.push([5, 6, 901], "ab") == ("ab", "")
    assert parser.push([7], "c") == ("", "c")

    def decode(ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids if i < 900)

    assert ReasoningParser(900, 901).split_final([900, 0, 1, 901, 2], decode) == ("ab", "c")


def test_push_rejects_a_tag_before_the_end(tok):
    parser = ReasoningParser.for_tokenizer(tok)
    with pytest.raises(ValueError, match="chunks"):
        parser.push([tok.think_end_id, 5], "</think>x")


def test_chunks_cut_after_each_tag(tok):
    parser = ReasoningParser(100, 101)
    assert parser.chunks([]) == [[]]
    assert parser.chunks([1, 2]) == [[1, 2]]
    assert parser.chunks([1, 100, 2, 101]) == [[1, 100], [2, 101]]
    assert parser.chunks([101, 101, 3]) == [[101], [101], [3]]


def reference_split(tok, output, skip):
    """Independent reference: the first </think> id splits; <think> ids before it are dropped."""
    end = tok.think_end_id
    cut = output.index(end) if end in output else len(output)
    segments, current = [], []
    for token_id in output[:cut]:
        if token_id == tok.think_start_id:
            segments.append(current)
            current = []
        else:
            current.append(token_id)
    reasoning = "".join(tok.decode(s, skip_special_tokens=skip) for s in [*segments, current])
    content = tok.decode(output[cut + 1 :], skip_special_tokens=skip)
    return reasoning, content, end in output


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_random_outputs_streamed_in_any_chunks(tok, r1_prompt, skip):
    rng = random.Random(5)
    words = sorted(set(tok.encode("Let me think 😀 深度求索 🇫🇷 step by step.\n\nSo")))
    partial = [i for i in words if tok.decode([i]).endswith(REPLACEMENT_CHAR)]
    assert partial  # the emoji and flag split into byte pieces
    pool = words + partial * 3 + [tok.think_start_id, tok.think_end_id, tok.eos_token_id, tok.bos_token_id]
    for _ in range(300):
        output = [rng.choice(pool) for _ in range(rng.randint(0, 30))]
        expected_reasoning, expected_content, ended = reference_split(tok, output, skip)
        sizes = [rng.choice([1, 2, 3, 7]) for _ in range(len(output))]
        for chunking in ([1] * len(output), sizes):
            reasoning, content, _ = run(tok, r1_prompt, output, chunking, skip=skip)
            assert (reasoning, content) == (expected_reasoning, expected_content), output
        expected_final = (expected_reasoning, (expected_content or None) if ended else None)
        assert final(tok, r1_prompt, output, skip=skip) == expected_final, output
