"""The group's side of a rank-to-rank hand-off: a hand-off whose latents its rank could not read ends the
request with a KVTransferError (UNAVAILABLE to the client, retried), and the group stays healthy; a prefill
rank whose unread hand-offs reach its bound admits no new prompt until decode ranks read them."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig
from r1serve.runtime.engine.outputs import KVHandoff, KVTransferError, RemoteLatents
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.group import ExpertParallelGroup, rank_specs
from r1serve.runtime.parallel.rank import rank_main


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
        handoff.validate(2, 8, 16)
    handoff.latents = torch.zeros(2, 3, 8)
    handoff.validate(2, 8, 16)


class HeldUntilRead:
    """A prefill rank's parking whose hand-offs stay unread until the test reads them."""

    def __init__(self):
        self.unread: list[int] = []

    def park(self, latents: torch.Tensor) -> RemoteLatents:
        nbytes = latents.numel() * latents.element_size()
        self.unread.append(nbytes)
        return RemoteLatents(None, tuple(latents.shape), "float32", nbytes, "test")

    def waiting_bytes(self) -> int:
        return sum(self.unread)

    def read_all(self) -> None:
        self.unread.clear()


def _next(outbox: queue.Queue, kind: str, timeout_s: float = 60.0) -> tuple:
    deadline = time.monotonic() + timeout_s
    while True:
        message = outbox.get(timeout=max(0.01, deadline - time.monotonic()))
        assert message[0] != "failed", message
        if message[0] == kind:
            return message


def test_a_prefill_rank_admits_no_new_prompt_while_its_unread_hand_offs_exceed_the_bound(tiny_checkpoint):
    [spec] = rank_specs(str(tiny_checkpoint), 1, engine=EngineConfig(role="prefill", num_blocks=64,
                                                                     max_parked_bytes=1),
                        dtype="float32", device="cpu", redundant=0, timeout_s=30)
    parking, inbox, outbox = HeldUntilRead(), queue.Queue(), queue.Queue()
    rank = threading.Thread(target=rank_main, args=(spec, inbox, outbox), kwargs={"parking": parking}, daemon=True)
    rank.start()
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        _next(outbox, "ready")
        inbox.put(("add", "a", [5, 6, 7, 8, 9], greedy, ()))
        [first] = _next(outbox, "outputs")[2]
        assert first.request_id == "a" and first.handoff is not None and parking.waiting_bytes() > 0
        inbox.put(("add", "b", [10, 11, 12], greedy, ()))
        inbox.put(("ask", "t", "stats"))
        stats = _next(outbox, "reply")[2]
        assert (stats.waiting, stats.running, stats.admission_held) == (1, 0, True)
        assert stats.handoff_bytes_waiting == parking.waiting_bytes()
        parking.read_all()  # decode ranks read what was parked: b is prefilled
        [second] = _next(outbox, "outputs")[2]
        assert second.request_id == "b" and second.handoff is not None
        inbox.put(("ask", "t", "stats"))
        assert _next(outbox, "reply")[2].admission_held  # b's own hand-off is unread now
    finally:
        inbox.put(("stop",))
        rank.join(30)
