"""Streaming token ids -> text, emitting only characters that later tokens can no longer change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["REPLACEMENT_CHAR", "IncrementalDetokenizer"]

# Byte-level BPE splits one character across tokens; decoding a partial character yields this.
REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded with the first output tokens: enough for decoders whose output depends on
# the previous token (e.g. SentencePiece's leading space), which byte-level BPE does not need.
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, in O(new tokens) per push.

    Keeps a short window of tokens: ``prefix`` tokens whose text was already emitted (decoded again
    only as context) followed by ``pending`` tokens whose text is not yet final. Each token's text is
    the window's decode minus the prefix's decode; the window moves on as soon as the text no longer
    ends inside a character. All pushes plus ``flush()`` equal ``decode(output_ids)``.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt ending inside a character would absorb the output's first bytes into prompt text.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._window: list[int] = context  # tokens from the prefix offset on; older ones are dropped
        self._read = len(context)  # window index where the not-yet-emitted tokens start
        self._prefix_text = self._decode(context)  # decode of window[:read]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text that became final (possibly empty)."""
        return "".join(self._push_one(token_id) for token_id in token_ids)

    def _push_one(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        if not text.endswith(REPLACEMENT_CHAR):
            return self._advance(text, len(self._window)) if len(text) > len(self._prefix_text) else ""
        if len(self._window) - 1 > self._read:
            before = self._decode(self._window[:-1])
            if len(text) > len(before) > len(self._prefix_text) and text.startswith(before):
                # The new token added characters after an undecodable tail, so that tail is garbage
                # for good (a character cannot resume after another one): emit up to the previous
                # token rather than hold a run of invalid bytes back until the end.
                return self._advance(before, len(self._window) - 1)
        return ""

    def _advance(self, text: str, read: int) -> str:
        """Emit ``text`` past the prefix, then make window[old read:read] the new prefix."""
        emitted = text[len(self._prefix_text) :]
        del self._window[: self._read]
        self._read = read - self._read
        self._prefix_text = self._decode(self._window[: self._read])
        return emitted

    def flush(self) -> str:
        """At the end of the output: the held-back text, replacement characters included."""
        text = self._decode(self._window)
        emitted = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return emitted
