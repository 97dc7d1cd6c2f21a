"""What an expert-parallel group sends a survivor to continue a request whose rank was lost (no processes)."""

from __future__ import annotations

import torch

from r1serve.runtime.engine.outputs import KVHandoff
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.group import _Tracked

PARAMS = SamplingParams(max_tokens=20, temperature=0.7, seed=3)


def test_a_request_that_streamed_nothing_is_sent_again_unchanged():
    command = ("add", "r", [5, 6, 7], PARAMS, (9,))
    assert _Tracked(command).restart() is command


def test_a_request_continues_from_its_prompt_and_every_token_streamed_with_its_latest_generator():
    tracked = _Tracked(("add", "r", [5, 6, 7], PARAMS, (9,)))
    tracked.token_ids += [11, 12]
    tracked.generator_state = torch.tensor([1, 2, 3], dtype=torch.uint8)
    kind, request_id, prompt, params, resumed, state = tracked.restart()
    assert (kind, request_id, prompt, params, resumed) == ("add", "r", [5, 6, 7], PARAMS, (9, 11, 12))
    assert state is tracked.generator_state


def test_a_hand_off_continues_as_a_computed_again_request_from_the_prefill_ranks_generator():
    handoff = KVHandoff(request_id="h", prompt_token_ids=[1, 2, 3], params=PARAMS, first_token_id=40,
                        latents=torch.zeros(1), generator_state=torch.tensor([7], dtype=torch.uint8),
                        resumed_token_ids=[30])
    tracked = _Tracked(("handoff", handoff))
    tracked.token_ids += [40]  # the first token, streamed when the decode rank took the hand-off
    kind, request_id, prompt, _, resumed, state = tracked.restart()
    assert (kind, request_id, prompt, resumed) == ("add", "h", [1, 2, 3], (30, 40))
    assert state is handoff.generator_state  # no output of the decode rank said where its draws stand yet
