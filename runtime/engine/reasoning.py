"""DeepSeek-R1's output split into chain of thought and answer at ``</think>``, as vLLM's deepseek_r1 parser does."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["ReasoningParser", "reasoning_ended"]

THINK_START = "<think>"
THINK_END = "</think>"


def reasoning_ended(token_ids: Sequence[int], think_start_id: int, think_end_id: int) -> bool:
    """Whether the last think tag in ``token_ids`` closes the reasoning (a prompt with thinking disabled)."""
    for token_id in reversed(token_ids):
        if token_id == think_start_id:
            return False
        if token_id == think_end_id:
            return True
    return False


class ReasoningParser:
    """Routes one request's streamed text to ``reasoning`` until ``</think>``, to ``content`` after it.

    The boundary is found by token id, never by searching text, so a model that spells "</think>"
    out of ordinary tokens does not end its reasoning, and no tag text leaks into either field. That
    needs the text of each think tag to arrive at the end of a push: feed each step's tokens through
    ``chunks()`` and give the detokenizer and this parser the same chunk::

        for chunk in parser.chunks(new_token_ids):
            reasoning, content = parser.push(chunk, detokenizer.push(chunk))
        reasoning, content = parser.push([], detokenizer.flush())  # once, at the end

    Before ``</think>`` everything is reasoning, whether ``<think>`` was generated or already ended the
    prompt (R1's template ends it with ``<think>\\n``); a generated ``<think>`` is dropped. After it
    everything is content. A prompt whose last think tag is ``</think>`` (thinking disabled), or
    ``enabled=False``, makes all output content.
    """

    def __init__(
        self,
        think_start_id: int,
        think_end_id: int,
        prompt_token_ids: Sequence[int] = (),
        *,
        enabled: bool = True,
        think_start_text: str = THINK_START,
        think_end_text: str = THINK_END,
    ):
        self.think_start_id = think_start_id
        self.think_end_id = think_end_id
        self._tags = {think_start_id: think_start_text, think_end_id: think_end_text}
        # Whether this request reasons at all is fixed by the prompt; _in_reasoning then tracks the output.
        self.reasons = enabled and not reasoning_ended(prompt_token_ids, think_start_id, think_end_id)
        self._in_reasoning = self.reasons

    @classmethod
    def for_tokenizer(cls, tokenizer, prompt_token_ids: Sequence[int] = (), *, enabled: bool = True) -> ReasoningParser:
        """A parser using ``tokenizer.think_start_id`` and ``think_end_id`` (raises if the vocabulary lacks them)."""
        return cls(tokenizer.think_start_id, tokenizer.think_end_id, prompt_token_ids, enabled=enabled)

    @property
    def in_reasoning(self) -> bool:
        return self._in_reasoning

    @property
    def reasoning_done(self) -> bool:
        """True once the output closed its reasoning with ``</think>``."""
        return self.reasons and not self._in_reasoning

    def chunks(self, token_ids: Sequence[int]) -> list[list[int]]:
        """``token_ids`` cut after every think tag, so each tag ends the chunk that holds it."""
        out: list[list[int]] = []
        current: list[int] = []
        for token_id in token_ids:
            current.append(token_id)
            if token_id in self._tags:
                out.append(current)
                current = []
        if current or not out:
            out.append(current)
        return out

    def push(self, token_ids: Sequence[int], text: str) -> tuple[str, str]:
        """(reasoning_delta, content_delta) for ``text``, the detokenized text of ``token_ids``."""
        if not self._in_reasoning:
            return "", text
        tag_positions = [i for i, token_id in enumerate(token_ids) if token_id in self._tags]
        if not tag_positions:
            return text, ""
        if tag_positions != [len(token_ids) - 1]:
            raise ValueError(
                f"a think tag must be the last token of a push (tags at {tag_positions} of {len(token_ids)} "
                "tokens); split the step's tokens with ReasoningParser.chunks() first"
            )
        tag_id = token_ids[-1]
        # The tag's text is absent when the detokenizer skips it as a special token.
        reasoning = text.removesuffix(self._tags[tag_id])
        if tag_id == self.think_end_id:
            self._in_reasoning = False
        return reasoning, ""

    def final(self, reasoning: str, content: str) -> tuple[str | None, str | None]:
        """Non-streaming fields from the concatenated deltas, with vLLM's nulls.

        No ``</think>`` in the output: all reasoning, content None. After it, empty content is None.
        A request that does not reason has reasoning None and content as generated.
        """
        if not self.reasons:
            return None, content
        if self._in_reasoning:
            return reasoning, None
        return reasoning, content or None

    def split_final(
        self, output_token_ids: Sequence[int], decode: Callable[[list[int]], str]
    ) -> tuple[str | None, str | None]:
        """Non-streaming split of a whole output; ``decode`` is the tokenizer's decode with the request's flags.

        Gives what streaming the same tokens would: think tags break a byte-level BPE's byte stream,
        so decoding chunk by chunk equals decoding the whole output. Leaves this parser untouched.
        """
        parser = ReasoningParser(
            self.think_start_id,
            self.think_end_id,
            enabled=self.reasons,
            think_start_text=self._tags[self.think_start_id],
            think_end_text=self._tags[self.think_end_id],
        )
        reasoning: list[str] = []
        content: list[str] = []
        for chunk in parser.chunks(output_token_ids):
            reasoning_delta, content_delta = parser.push(chunk, decode(chunk) if chunk else "")
            reasoning.append(reasoning_delta)
            content.append(content_delta)
        return parser.final("".join(reasoning), "".join(content))
