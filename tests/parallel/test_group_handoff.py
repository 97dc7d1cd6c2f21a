"""The group's side of a rank-to-rank hand-off: a hand-off whose latents its rank could not read ends the
request with a KVTransferError (UNAVAILABLE to the client, retried), and the group stays healthy."""

from __future__ import annotations

import asyncio
import queue

import pytest
import torch

from r1serve.runtime.engine.outputs import KVHandoff, KVTransferError, RemoteLatents
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.group import ExpertParallelGroup


class LostHandoffs:
    """One rank that answers every hand-off as its actor does when the prefill rank is gone."""

    world_size = 1

    def __init__(self):
        self.inbox: queue.Queue = queue.Queue()
        self.inbox.put(("ready", 0, 0))

    def send(self, rank: int, command: tuple) -> None:
        if command[0] == "handoff":
            self.inbox.put(("lost", rank, command[1].request_id,
                            f"{command[1].request_id}: KV cache lost in transfer (nixl): OwnerDiedError"))

    def receive(self, timeout_s: float):
        try:
            return self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def dead_rank(self):
        return None

    def stop(self, timeout_s: float) -> None:
        pass

    def kill(self) -> None:
        pass


def test_a_hand_off_whose_latents_are_lost_fails_that_request_only():
    group = ExpertParallelGroup(LostHandoffs(), start_timeout_s=5)
    remote = RemoteLatents(ref=None, shape=(2, 3, 8), dtype="float32", nbytes=192, transport="nixl")
    handoff = KVHandoff("r1", [1, 2, 3], 9, SamplingParams(max_tokens=4), remote)

    async def consume():
        return [out async for out in group.generate_from_handoff(handoff)]

    try:
        with pytest.raises(KVTransferError, match="r1: KV cache lost in transfer"):
            asyncio.run(consume())
        assert group.healthy and handoff.nbytes == 192
    finally:
        group.shutdown()


def test_a_hand_off_still_on_its_prefill_rank_is_refused_by_an_engine():
    remote = RemoteLatents(ref=None, shape=(2, 3, 8), dtype="float32", nbytes=192, transport="nixl")
    handoff = KVHandoff("r1", [1, 2, 3], 9, SamplingParams(), remote)
    with pytest.raises(ValueError, match="handoff.latents: still on the prefill rank"):
        handoff.validate(2, 8)
    handoff.latents = torch.zeros(2, 3, 8)
    handoff.validate(2, 8)
