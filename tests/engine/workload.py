"""The requests the engine tests send, and how they drive an engine to the end."""

from __future__ import annotations

from r1serve.runtime.engine.engine import LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SHARED = list(range(2000, 2040))  # a 40-token prefix that several prompts share


def prompts() -> list[list[int]]:
    lengths = [3, 90, 17, 55, 1, 33, 70, 8]
    out = [list(range(300 + 7 * i, 300 + 7 * i + n)) for i, n in enumerate(lengths)]
    out += [SHARED + [5, 6, 7], SHARED + [9], SHARED + list(range(40))]
    return out


def drain(engine: LLMEngine, outputs: dict, max_steps: int = 10_000) -> None:
    """Step until the engine has no work, collecting outputs per request id."""
    for _ in range(max_steps):
        if not engine.has_work:
            return
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]
