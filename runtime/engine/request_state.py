"""One request's output pipeline: token ids -> text -> reasoning/content split -> stop checks."""

from __future__ import annotations

import torch

from .detokenizer import IncrementalDetokenizer
from .outputs import RequestError, RequestOutput
from .reasoning import ReasoningParser
from .sampler import make_generator
from .sampling import SamplingParams
from .sequence import Sequence
from .stops import FinishReason, StopChecker


class RequestState:
    """Turns a sequence's new tokens into RequestOutputs; decides when the request is finished."""

    def __init__(self, seq: Sequence, params: SamplingParams, tokenizer, *, max_model_len: int, reasoning: bool,
                 device: torch.device | str = "cpu"):
        self.seq, self.params = seq, params
        self.generator: torch.Generator | None = make_generator(params.seed, device)  # where the logits are
        prompt = seq.token_ids[: seq.prompt_len]
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens)
        self.parser = ReasoningParser.for_tokenizer(tokenizer, prompt, enabled=reasoning)
        # Stop strings are matched within each field: no stop string can span the </think> boundary.
        eos = tokenizer.eos_token_id
        self.reasoning_stops = StopChecker(params, eos, max_model_len)
        self.content_stops = StopChecker(params, eos, max_model_len)
        self.max_model_len = max_model_len
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def replay(self, token_ids: list[int]) -> None:
        """A resumed request: its tokens already streamed to the client (already in the sequence) pass through
        the detokenizer, the reasoning split and the stop checks, and nothing of them is emitted again; text
        the client has not seen yet (held back at a stop-string or character boundary) comes out later."""
        if token_ids:
            self.process(list(token_ids))
        if self.finished:
            raise RequestError("resumed_token_ids", "the request had already finished with these tokens")

    def process(self, new_token_ids: list[int]) -> RequestOutput:
        """The sequence has just grown by `new_token_ids` (already appended to seq.token_ids)."""
        out = self._empty_output()
        for position, token_id in enumerate(new_token_ids):
            if self.finished:
                break
            out.token_ids.append(token_id)
            later = len(new_token_ids) - 1 - position  # each token's checks count the tokens up to it only
            reason = self.content_stops.check_token(token_id, self.seq.num_output_tokens - later,
                                                    self.seq.num_tokens - later)
            # A stop token's own text (e.g. EOS) is not part of the answer, as in vLLM.
            if reason != "stop" or self.params.include_stop_str_in_output:
                self._emit(out, [token_id])
            if self.content_stops.stopped or self.reasoning_stops.stopped:
                reason = "stop"
            if reason is not None:
                self.finish(out, reason)
        # Tokens after the one that finished the request are not part of it (several arrive at once with drafts).
        out.completion_tokens = self.seq.num_output_tokens - (len(new_token_ids) - len(out.token_ids))
        return out

    def finish(self, out: RequestOutput, reason: FinishReason) -> None:
        """Mark finished and flush whatever text was held back (unless a stop string cut it)."""
        self.finish_reason = reason
        tail = self.detokenizer.flush()
        if tail:
            self._route(out, [], tail)
        self._append(out, self.reasoning_stops.flush(), "")
        self._append(out, "", self.content_stops.flush())
        out.finished, out.finish_reason = True, reason

    def aborted(self, reason: FinishReason = "abort", error: str | None = None) -> RequestOutput:
        out = self._empty_output()
        out.finished, out.finish_reason, out.error = True, reason, error
        self.finish_reason = reason
        return out

    def _emit(self, out: RequestOutput, token_ids: list[int]) -> None:
        for chunk in self.parser.chunks(token_ids):
            self._route(out, chunk, self.detokenizer.push(chunk))

    def _route(self, out: RequestOutput, chunk: list[int], text: str) -> None:
        was_reasoning = self.parser.in_reasoning
        reasoning, content = self.parser.push(chunk, text)
        reasoning, _ = self.reasoning_stops.check_text(reasoning)
        if was_reasoning and not self.parser.in_reasoning:
            reasoning += self.reasoning_stops.flush()  # </think> closed the field: nothing more can match
        content, _ = self.content_stops.check_text(content) if not self.reasoning_stops.stopped else ("", False)
        self._append(out, reasoning, content)

    @staticmethod
    def _append(out: RequestOutput, reasoning: str, content: str) -> None:
        out.reasoning += reasoning
        out.content += content
        out.text += reasoning + content

    def _empty_output(self) -> RequestOutput:
        return RequestOutput(
            self.seq.request_id,
            prompt_tokens=self.seq.prompt_len,
            completion_tokens=self.seq.num_output_tokens,
            cached_tokens=self.seq.num_cached_tokens,
        )
