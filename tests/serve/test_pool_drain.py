"""A pool replica being removed lets its engine finish what it holds before stopping (no Ray)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from r1serve.runtime.serve.pool import PoolServer


class Engine:
    """Reports `busy_polls` busy stats, then idle ones."""

    def __init__(self, busy_polls: int):
        self.busy_polls = busy_polls
        self.polls = 0

    def stats(self):
        self.polls += 1
        busy = self.polls <= self.busy_polls
        return SimpleNamespace(running=int(busy), waiting=0)


def test_drain_waits_until_the_engine_is_idle():
    replica = SimpleNamespace(engine=Engine(busy_polls=3), role="decode")
    assert asyncio.run(PoolServer.drain(replica, timeout_s=5)) is True
    assert replica.engine.polls == 4


def test_drain_gives_up_after_its_timeout():
    replica = SimpleNamespace(engine=Engine(busy_polls=10**6), role="decode")
    assert asyncio.run(PoolServer.drain(replica, timeout_s=0.3)) is False
