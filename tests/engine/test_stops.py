"""StopChecker: token stops and limits, and stop strings that never leak into streamed text."""

from __future__ import annotations

import random

import pytest

from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.engine.stops import StopChecker

EOS = 1


def checker(**kwargs) -> StopChecker:
    return StopChecker(SamplingParams(**kwargs), eos_token_id=EOS, max_model_len=100)


def stream(stop_checker: StopChecker, deltas: list[str]) -> tuple[list[str], bool]:
    """Feed deltas until a stop string hits; return what was emitted (flush included) and whether it hit."""
    emitted = []
    for delta in deltas:
        text, hit = stop_checker.check_text(delta)
        emitted.append(text)
        if hit:
            return emitted, True
    return [*emitted, stop_checker.flush()], False


def reference(text: str, stops: tuple[str, ...], include: bool) -> tuple[str, bool]:
    """The text a single whole delta gives: cut at the stop string occurrence that ends first."""
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not ends:
        return text, False
    end, negative_len, _ = min(ends)
    return text[: end if include else end + negative_len], True


class TestTokens:
    def test_stop_token_id(self):
        assert checker(stop_token_ids=(7,)).check_token(7, 1, 10) == "stop"
        assert checker(stop_token_ids=(7,)).check_token(8, 1, 10) is None

    def test_eos(self):
        assert checker().check_token(EOS, 1, 10) == "stop"
        assert checker(ignore_eos=True).check_token(EOS, 1, 10) is None
        # A stop token id still stops when EOS is ignored, even if it is the EOS id.
        assert checker(ignore_eos=True, stop_token_ids=(EOS,)).check_token(EOS, 1, 10) == "stop"
        assert StopChecker(SamplingParams(), eos_token_id=None, max_model_len=100).check_token(EOS, 1, 10) is None

    def test_max_tokens(self):
        assert checker(max_tokens=3).check_token(5, 2, 10) is None
        assert checker(max_tokens=3).check_token(5, 3, 10) == "length"

    def test_context_full(self):
        assert checker().check_token(5, 1, 99) is None
        assert checker().check_token(5, 1, 100) == "length"

    def test_stop_wins_over_length(self):
        assert checker(max_tokens=1).check_token(EOS, 1, 100) == "stop"

    def test_bad_context_length(self):
        with pytest.raises(ValueError, match="max_model_len: must be at least 1"):
            StopChecker(SamplingParams(), EOS, 0)


class TestStrings:
    def test_no_stop_strings_pass_through(self):
        c = checker()
        assert c.check_text("abc") == ("abc", False)
        assert c.flush() == ""

    def test_stop_string_split_across_many_deltas(self):
        emitted, hit = stream(checker(stop=("STOP",)), ["Hello S", "T", "O", "P and more"])
        assert hit and emitted == ["Hello ", "", "", ""]

    def test_partial_match_is_released_when_it_fails(self):
        c = checker(stop=("STOP",))
        assert c.check_text("Hello ST") == ("Hello ", False)
        assert c.check_text("OR") == ("STOR", False)
        assert c.check_text("S") == ("", False)
        assert c.flush() == "S"

    def test_stop_at_the_very_beginning(self):
        assert checker(stop=("<|x|>",)).check_text("<|x|>rest") == ("", True)
        assert stream(checker(stop=("ab",)), ["a", "b", "c"]) == (["", ""], True)

    def test_include_stop_str_in_output(self):
        emitted, hit = stream(checker(stop=("END",), include_stop_str_in_output=True), ["The E", "ND", "ing"])
        assert hit and "".join(emitted) == "The END"

    def test_overlapping_stop_strings(self):
        # "bc" completes before "abcd" could: the first to complete wins, however the text is cut.
        for deltas in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
            emitted, hit = stream(checker(stop=("abcd", "bc")), deltas)
            assert hit and "".join(emitted) == "a"
        # Same end: the longer one, which started first.
        assert checker(stop=("c", "bc"), include_stop_str_in_output=False).check_text("xbcz") == ("x", True)
        assert checker(stop=("aab",)).check_text("aaab") == ("a", True)

    def test_self_overlapping_prefix_is_held(self):
        c = checker(stop=("aab",))
        assert c.check_text("xaa") == ("x", False)
        assert c.check_text("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
        assert c.check_text("b!") == ("", True)

    def test_after_a_hit_nothing_more(self):
        c = checker(stop=("x",))
        assert c.check_text("ax") == ("a", True)
        assert c.check_text("more") == ("", True) and c.flush() == ""
        assert c.stopped

    def test_unicode_stop_strings(self):
        emitted, hit = stream(checker(stop=("答案：",)), ["思考", "完毕。答", "案：42"])
        assert hit and "".join(emitted) == "思考完毕。"

    @pytest.mark.parametrize("include", [False, True])
    def test_random_deltas_match_the_whole_text(self, include):
        rng = random.Random(11 + include)
        for _ in range(500):
            stops = tuple(
                {"".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))}
            )
            text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
            deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            emitted, hit = stream(checker(stop=stops, include_stop_str_in_output=include), deltas)
            assert ("".join(emitted), hit) == reference(text, stops, include), (stops, deltas)
            if not include:
                assert not any(s in "".join(emitted) for s in stops)
