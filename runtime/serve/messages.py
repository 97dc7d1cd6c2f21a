"""What the Ingress and the pool replicas pass each other through deployment handles."""

from __future__ import annotations

from dataclasses import dataclass

from r1serve.runtime.engine.outputs import RequestOutput
from r1serve.runtime.engine.sampling import SamplingParams

from .connector import HandoffTicket


@dataclass(frozen=True)
class PoolRequest:
    """A validated, tokenized request: the only argument of `prefill` and `generate` (routers read it)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Tokens the client already has from a replica that was lost: the request continues after them.
    resumed_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillResult:
    """A prefill replica's answer: the first token and where decode finds the prompt's KV cache."""

    request_id: str
    first_token_id: int
    prompt_tokens: int
    cached_tokens: int
    ticket: HandoffTicket


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: deltas concatenated, totals and the end from the last."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    return RequestOutput(
        request_id=last.request_id,
        token_ids=[t for out in outputs for t in out.token_ids],
        text="".join(out.text for out in outputs),
        reasoning="".join(out.reasoning for out in outputs),
        content="".join(out.content for out in outputs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
        error=next((out.error for out in outputs if out.error), None),
    )


# RequestOutputs cross the replica -> Ingress hop as plain tuples: Ray pickles builtins much faster
# than dataclasses, and this hop carries every token.
_WIRE_FIELDS = ("request_id", "token_ids", "text", "reasoning", "content", "finished", "finish_reason",
                "prompt_tokens", "completion_tokens", "cached_tokens", "error")


def to_wire(out: RequestOutput) -> tuple:
    return tuple(getattr(out, name) for name in _WIRE_FIELDS)


def from_wire(data: tuple) -> RequestOutput:
    return RequestOutput(**dict(zip(_WIRE_FIELDS, data)))
