"""IncrementalDetokenizer on DeepSeek's byte-level BPE: streamed text equals decoding everything at once."""

from __future__ import annotations

import random

import pytest

from r1serve.runtime.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from r1serve.runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The answer is 42.",
    "你好，世界！深度求索的模型。",
    "Emoji: 😀🚀👍🏽 and flags 🇫🇷🇯🇵, family 👨‍👩‍👧",
    "Math 𝄞 ∑ x² ≤ ∞ and ümlauts café",
    "日本語のテキストとカタカナ",
    "<think>\nreason\n</think>\n\nanswer",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def pool(tok) -> list[int]:
    """Token ids of natural text, lone UTF-8 byte tokens, special and added tokens, one unknown id."""
    text_ids = sorted({i for text in TEXTS for i in tok.encode(text)})
    partial = [i for i in range(tok.vocab_size) if tok.decode([i]).endswith(REPLACEMENT_CHAR)]
    assert len(partial) > 1000  # pieces ending inside a character: lone bytes, halves of CJK and emoji
    rng = random.Random(0)
    special = [
        tok.bos_token_id,
        tok.eos_token_id,
        2,
        10,
        tok.think_start_id,
        tok.think_end_id,
        tok.token_to_id("<｜User｜>"),
        tok.token_to_id("<｜Assistant｜>"),
    ]
    return text_ids + rng.sample(partial, 120) + special + [tok.vocab_size + 3]


def stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    pieces, start = [], 0
    for size in sizes:
        pieces.append(detok.push(ids[start : start + size]))
        start += size
    return [*pieces, detok.flush()]


def random_sizes(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.choice([0, 1, 1, 2, 3, 5, 8]))
    return sizes


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_stream_equals_decode_on_random_sequences(tok, pool, skip):
    rng = random.Random(1 if skip else 2)
    for _ in range(400):
        # About half the pool are partial pieces, so characters get split and broken in many ways.
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        expected = tok.decode(ids, skip_special_tokens=skip)
        one_by_one = stream(IncrementalDetokenizer(tok, prompt, skip), ids, [1] * len(ids))
        chunked = stream(IncrementalDetokenizer(tok, prompt, skip), ids, random_sizes(rng, len(ids)))
        assert "".join(one_by_one) == expected, (prompt, ids)
        assert "".join(chunked) == expected, (prompt, ids)


def test_runs_of_invalid_bytes(tok, pool):
    """Streams made almost only of partial-character pieces, where the text stays undecodable longest."""
    partial = [i for i in pool if tok.decode([i]).endswith(REPLACEMENT_CHAR)]
    ascii_ids = tok.encode("a b.")
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.choice(partial if rng.random() < 0.85 else ascii_ids) for _ in range(rng.randint(1, 30))]
        out = stream(IncrementalDetokenizer(tok, [], True), ids, [1] * len(ids))
        assert "".join(out) == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("text", TEXTS)
def test_valid_text_never_streams_a_broken_character(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt: "), skip_special_tokens=False)
    pieces = [detok.push([i]) for i in ids]
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_split_character_is_held_until_complete(tok):
    first, second = tok.encode("😀")
    detok = IncrementalDetokenizer(tok, [], True)
    assert detok.push([first]) == ""
    assert detok.push([second]) == "😀"
    assert detok.flush() == ""


def test_flush_releases_an_unfinished_character(tok):
    first, _ = tok.encode("😀")
    detok = IncrementalDetokenizer(tok, [], True)
    assert detok.push(tok.encode("ok ") + [first]) == "ok "
    assert detok.flush() == REPLACEMENT_CHAR
    assert detok.flush() == ""


def test_prompt_ending_inside_a_character_does_not_swallow_output(tok):
    first, second = tok.encode("😀")
    detok = IncrementalDetokenizer(tok, tok.encode("x") + [first], True)
    assert detok.push([second]) + detok.flush() == tok.decode([second])


def test_special_tokens(tok):
    ids = [*tok.encode("Hi"), tok.eos_token_id]
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert kept.push(ids) + kept.flush() == "Hi<｜end▁of▁sentence｜>"
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert skipped.push(ids) + skipped.flush() == "Hi"
    # <think>/</think> are added tokens but not special: skip_special_tokens keeps them.
    think = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert think.push([tok.think_start_id, *tok.encode("x"), tok.think_end_id]) == "<think>x</think>"


class CountingTokenizer:
    """Counts how many token ids all decode calls look at."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids_decoded = tok, 0

    def decode(self, ids, skip_special_tokens=False):
        self.ids_decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_is_linear_in_output_length(tok):
    ids = tok.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, list(range(100, 200)), True)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 1000 and counting.ids_decoded < 12 * len(ids)
