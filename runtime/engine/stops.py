"""When a request finishes: stop tokens, EOS and length limits on ids; stop strings on the streamed text."""

from __future__ import annotations

from typing import Literal

from r1serve.runtime.engine.sampling import SamplingParams

__all__ = ["FinishReason", "StopChecker"]

FinishReason = Literal["stop", "length", "abort", "error"]


class StopChecker:
    """One request's stop conditions.

    Stop strings are matched on the text stream; text that might be the start of a stop string
    completed by a later delta is held back, so streamed text never shows part of a stop string.
    The match that ends first wins (ties: the longest), which makes the result independent of how
    the text was cut into deltas.
    """

    def __init__(self, params: SamplingParams, eos_token_id: int | None, max_model_len: int):
        if max_model_len < 1:
            raise ValueError(f"max_model_len: must be at least 1 (got {max_model_len!r})")
        self._params = params
        self._stop_ids = frozenset(params.stop_token_ids)
        self._eos = None if params.ignore_eos else eos_token_id
        self._max_model_len = max_model_len
        self._held = ""
        self.stopped = False  # a stop string was found; later text is dropped

    def check_token(self, token_id: int, num_output_tokens: int, total_len: int) -> FinishReason | None:
        """After appending ``token_id``: output has ``num_output_tokens`` tokens, prompt + output ``total_len``."""
        if token_id in self._stop_ids or token_id == self._eos:
            return "stop"
        if num_output_tokens >= self._params.max_tokens or total_len >= self._max_model_len:
            return "length"
        return None

    def check_text(self, new_text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit). After a hit nothing more is emitted."""
        if self.stopped:
            return "", True
        stops = self._params.stop
        if not stops:
            return new_text, False
        text = self._held + new_text
        match = _first_match(text, stops)
        if match is not None:
            start, end = match
            self.stopped = True
            self._held = ""
            return text[: end if self._params.include_stop_str_in_output else start], True
        hold = max(_partial_suffix(text, stop) for stop in stops)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """At the end of the output: the held-back tail, which no stop string completed."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _first_match(text: str, stops: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the stop string occurrence that ends first; ties go to the earliest start."""
    best: tuple[int, int] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0:
            end = start + len(stop)
            if best is None or (end, start) < (best[1], best[0]):
                best = (start, end)
    return best


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
    if not text:
        return 0
    last = text[-1]
    end = min(len(stop) - 1, len(text))
    # Only prefixes ending in the text's last character can match: jump between those.
    while (i := stop.rfind(last, 0, end)) >= 0:
        if text.endswith(stop[: i + 1]):
            return i + 1
        end = i
    return 0
