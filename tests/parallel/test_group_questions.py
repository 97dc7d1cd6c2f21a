"""The group's questions to its ranks (stats, load, placements) are answered by every rank serving when the answer
comes, also by a rank that starts serving while the question waits (it joined as the group grew back), and a rank
that never answers is named."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from r1serve.runtime.parallel.group import ExpertParallelGroup, GroupFailedError, Grow
from r1serve.runtime.parallel.layout import Failover


class _ScriptedRanks:
    """Stands in for the rank processes: each is ready at once, and answers a question with its own number once
    `answering` is set (a rank in `silent` never does); "reformed" messages are delivered as a test posts them."""

    def __init__(self, world_size: int):
        self.world_size, self.specs = world_size, []
        self.outbox: queue.Queue = queue.Queue()
        for rank in range(world_size):
            self.outbox.put(("ready", rank, 0))
        self.asked: dict[int, threading.Event] = {rank: threading.Event() for rank in range(world_size)}
        self.answering = threading.Event()
        self.silent: set[int] = set()

    def send(self, rank: int, command: tuple) -> None:
        if command[0] != "ask":
            return
        self.asked[rank].set()

        def answer():
            self.answering.wait()
            if rank not in self.silent:
                self.outbox.put(("reply", rank, f"rank {rank}", command[1]))

        threading.Thread(target=answer, daemon=True).start()

    def receive(self, timeout_s: float) -> tuple | None:
        try:
            return self.outbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def dead_ranks(self) -> dict[int, str]:
        return {}

    def kill_rank(self, rank: int) -> None:
        pass

    def stop(self, timeout_s: float) -> None:
        pass

    def kill(self) -> None:
        pass


@pytest.fixture
def growing():
    """A degraded group of 2 whose lost rank 1 was respawned and the survivor told to switch: rank 1 is a member
    but not serving yet."""
    ranks = _ScriptedRanks(2)
    group = ExpertParallelGroup(ranks, failover=Failover("degrade"), grow_back_interval_s=None)
    group.members = [1, 0]
    group._grow = Grow(time.monotonic(), 1, joiners=(1,), members=(1, 0), sent=time.monotonic())
    yield ranks, group
    group.shutdown(1.0)


def test_a_rank_that_starts_serving_while_a_question_waits_is_asked_too(growing):
    ranks, group = growing
    answers: list = []
    asking = threading.Thread(target=lambda: answers.append(group._ask_every_rank("stats", 10.0)), daemon=True)
    asking.start()
    assert ranks.asked[0].wait(5.0) and not ranks.asked[1].is_set()  # the joiner is not serving yet
    for rank in (1, 0):  # both serve in the grown group
        ranks.outbox.put(("reformed", rank, 1, 0))
    assert ranks.asked[1].wait(5.0)
    ranks.answering.set()
    asking.join(10.0)
    assert answers == [["rank 0", "rank 1"]]


def test_a_rank_that_does_not_answer_is_named(growing):
    ranks, group = growing
    group._grow = None
    ranks.silent.add(1)
    ranks.answering.set()
    with pytest.raises(GroupFailedError, match=r"ranks \[1\] did not answer 'stats' within 1s"):
        group._ask_every_rank("stats", 1.0)
