"""An expert-parallel group of rank processes behind the EngineClient interface."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any, AsyncIterator

from r1serve.runtime.engine.engine import EngineConfig
from r1serve.runtime.engine.interface import last_output
from r1serve.runtime.engine.outputs import (
    EngineStats,
    EngineUnavailableError,
    KVHandoff,
    KVTransferError,
    RequestError,
    RequestOutput,
)
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.engine.stream_relay import StreamRelay

from .layout import GroupConfig, free_tcp_address
from .rank import RankSpec
from .transport import DirectLatents, GlooLatents, ProcessTransport, RankTransport, RayTransport, rank0_address

log = logging.getLogger(__name__)


class GroupFailedError(EngineUnavailableError):
    """A rank died or a collective failed: the group serves nothing more."""


def rank_specs(checkpoint: str, world_size: int, *, engine: EngineConfig, dtype: str, device: str,
               redundant: int, timeout_s: float, address: str | None = None,
               options: dict[str, Any] | None = None) -> list[RankSpec]:
    address = address or free_tcp_address()
    return [RankSpec(GroupConfig(world_size, rank, address, timeout_s=timeout_s), checkpoint, engine, dtype, device,
                     redundant, dict(options or {})) for rank in range(world_size)]


class ExpertParallelGroup:
    """`world_size` rank processes that together hold every expert; attention is data-parallel, so each
    request lives on one rank, chosen as the least loaded. One thread relays the ranks' outputs to the
    waiting callers and watches the processes: a rank that dies fails every request within `timeout_s`."""

    def __init__(self, transport: RankTransport, *, start_timeout_s: float = 300.0, watch_every_s: float = 1.0,
                 rebalance_interval_s: float | None = None):
        self._transport = transport
        self.world_size = transport.world_size
        self.error: str | None = None
        self._watch_every_s = watch_every_s
        self._stopping = False
        self.expert_bytes = self._await_ready(start_timeout_s)
        self._streams = StreamRelay()
        self._owner: dict[str, tuple[int, int]] = {}  # request id -> (rank, tokens it may occupy)
        self._replies: dict[str, queue.Queue] = {}
        self._asking = threading.Lock()  # one question to the ranks at a time: replies carry no token
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._epochs = itertools.count(1)  # rebalances asked of the ranks
        self._rebalancing: dict[int, queue.Queue] = {}
        self._relay_thread = threading.Thread(target=self._relay_loop, name="r1serve-ep-relay", daemon=True)
        self._relay_thread.start()
        if rebalance_interval_s is not None and self.world_size > 1:  # experts.rebalanceIntervalSeconds
            threading.Thread(target=self._rebalance_on_schedule, args=(rebalance_interval_s,), daemon=True,
                             name="r1serve-ep-rebalance").start()

    @classmethod
    def in_processes(cls, checkpoint: str, world_size: int, *, engine: EngineConfig = EngineConfig(),
                     dtype: str = "float32", device: str = "cpu", redundant: int = 0, timeout_s: float = 30.0,
                     start_timeout_s: float = 300.0, rebalance_interval_s: float | None = None,
                     options: dict[str, Any] | None = None) -> ExpertParallelGroup:
        """A group of local processes (one machine, no Ray): tests, benchmarks, the offline CLI."""
        return cls(ProcessTransport(rank_specs(checkpoint, world_size, engine=engine, dtype=dtype, device=device,
                                               redundant=redundant, timeout_s=timeout_s, options=options)),
                   start_timeout_s=start_timeout_s, rebalance_interval_s=rebalance_interval_s)

    @classmethod
    def on_ray(cls, checkpoint: str, bundles: list[dict[str, float]], *, engine: EngineConfig, dtype: str,
               device: str, redundant: int, placement_group=None, timeout_s: float = 60.0,
               direct: DirectLatents | GlooLatents | None = None,
               rebalance_interval_s: float | None = None) -> ExpertParallelGroup:
        """One rank per bundle, as Ray actors in bundles 1..N of `placement_group` (a Serve replica's own,
        whose bundle 0 is the replica); without one the ranks are scheduled freely. With `direct`, hand-offs
        move rank to rank."""
        address = rank0_address(placement_group, timeout_s)
        specs = rank_specs(checkpoint, len(bundles), engine=engine, dtype=dtype, device=device,
                           redundant=redundant, timeout_s=timeout_s, address=address)
        log.info("starting %d %s ranks at %s", len(bundles), engine.role, address)
        return cls(RayTransport(specs, bundles, placement_group=placement_group, direct=direct),
                   rebalance_interval_s=rebalance_interval_s)

    # -- EngineClient ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       resumed: tuple[int, ...] = ()) -> AsyncIterator[RequestOutput]:
        rank = self._pick_rank(len(prompt_token_ids) + params.max_tokens)
        q = self._open(request_id, rank, len(prompt_token_ids) + params.max_tokens)
        self._transport.send(rank, ("add", request_id, list(prompt_token_ids), params, tuple(resumed)))
        async for out in self._stream(request_id, q):
            yield out

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      resumed: tuple[int, ...] = ()) -> RequestOutput:
        return await last_output(self.generate(request_id, prompt_token_ids, params, resumed))

    async def generate_from_handoff(self, handoff: KVHandoff) -> AsyncIterator[RequestOutput]:
        size = len(handoff.prompt_token_ids) + handoff.params.max_tokens
        rank = self._pick_rank(size)
        q = self._open(handoff.request_id, rank, size)
        self._transport.send(rank, ("handoff", handoff))
        async for out in self._stream(handoff.request_id, q):
            yield out

    async def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            self._transport.send(owner[0], ("abort", request_id))

    def stats(self) -> EngineStats:
        """The group's totals (summed over ranks; a flag is set when any rank's is)."""
        per_rank = self.rank_stats()
        first = per_rank[0]
        combined = {f: (any if isinstance(getattr(first, f), bool) else sum)(getattr(s, f) for s in per_rank)
                    for f in first.__dataclass_fields__ if f != "role"}
        return replace(first, **combined)

    def describe(self) -> dict[str, str]:
        """Rank 0's description (every rank runs the same paths), with the group's size."""
        per_rank = self._ask_every_rank("describe", 30.0)
        return {**per_rank[0], "ranks": str(len(per_rank))}

    def rank_stats(self, timeout_s: float = 30.0) -> list[EngineStats]:
        return self._ask_every_rank("stats", timeout_s)

    def placements(self, timeout_s: float = 30.0) -> list[dict[int, tuple[int, ...]]]:
        """Per rank: MoE layer -> physical_to_logical (every rank holds the same view)."""
        return self._ask_every_rank("placements", timeout_s)

    def expert_load(self, timeout_s: float = 30.0) -> dict[int, list[int]]:
        """Token copies routed to each logical expert so far, per MoE layer, summed over the ranks."""
        totals: dict[int, list[int]] = {}
        for per_rank in self._ask_every_rank("load", timeout_s):
            for layer, counts in per_rank.items():
                totals[layer] = [a + b for a, b in zip(totals.get(layer, [0] * len(counts)), counts)]
        return totals

    def cached_prefix_hashes(self, limit: int) -> list[int]:
        """Every rank's newest cached prefix blocks (each rank caches its own sequences), `limit` in all."""
        merged: dict[int, None] = {}
        for hashes in self._ask_every_rank("prefix_hashes", 5.0, limit):
            merged.update(dict.fromkeys(hashes))
        return list(merged)[-limit:] if limit > 0 else []

    def _ask_every_rank(self, command: str, timeout_s: float, *args) -> list:
        if not self.healthy:
            raise GroupFailedError(f"the expert-parallel group is down: {self.error}")
        reply: queue.Queue = queue.Queue()
        token = f"{command}-{next(self._ids)}"
        self._asking.acquire()
        self._replies[token] = reply
        try:
            for rank in range(self.world_size):
                self._transport.send(rank, (command, *args))
            results = [reply.get(timeout=timeout_s) for _ in range(self.world_size)]
        except queue.Empty:
            raise GroupFailedError(f"ranks did not answer {command!r} within {timeout_s:.0f}s") from None
        finally:
            self._replies.pop(token, None)
            self._asking.release()
        return [answer for _, answer in sorted(results, key=lambda r: r[0])]

    def rebalance(self, timeout_s: float = 300.0) -> bool:
        """Rebalance experts from the load seen so far; returns once every rank uses the new placement (True)
        or kept its own because nothing would change (False). The ranks agree on one epoch per call: a rank
        that hears of it late does not rebalance a second time."""
        if not self.healthy:
            raise GroupFailedError(f"the expert-parallel group is down: {self.error}")
        done: queue.Queue = queue.Queue()
        with self._lock:
            epoch = next(self._epochs)
            self._rebalancing[epoch] = done
        try:
            for rank in range(self.world_size):
                self._transport.send(rank, ("rebalance", epoch))
            deadline = time.monotonic() + timeout_s
            answers = [done.get(timeout=max(0.0, deadline - time.monotonic())) for _ in range(self.world_size)]
            if any(rank is None for rank, _ in answers):  # the group failed or stopped meanwhile
                raise GroupFailedError(f"rebalance {epoch} did not finish: the expert-parallel group is down: "
                                       f"{self.error or 'shutting down'}")
        except queue.Empty:
            raise GroupFailedError(f"ranks did not finish rebalance {epoch} within {timeout_s:.0f}s") from None
        finally:
            with self._lock:
                self._rebalancing.pop(epoch, None)
        return any(changed for _, changed in answers)

    def _end_rebalances(self) -> None:
        """Wake every rebalance waiting for ranks that will not answer."""
        with self._lock:
            waiting = list(self._rebalancing.values())
        for q in waiting:
            for _ in range(self.world_size):
                q.put((None, False))

    def _rebalance_on_schedule(self, interval_s: float) -> None:
        while not self._stopping and self.error is None:
            time.sleep(interval_s)
            if self._stopping or self.error is not None:
                return
            try:
                changed = self.rebalance()
                log.info("scheduled expert rebalance: %s", "placement changed" if changed else "no change")
            except Exception:  # noqa: BLE001 - a failed group reports itself; the schedule just ends
                log.exception("scheduled expert rebalance failed")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._end_rebalances()
        self._transport.stop(timeout_s)

    # -- internals ---------------------------------------------------------------------------------

    def _await_ready(self, timeout_s: float) -> list[int]:
        ready: dict[int, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.world_size:
            message = self._transport.receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                self._transport.kill()
                missing = sorted(set(range(self.world_size)) - set(ready))
                raise GroupFailedError(f"ranks {missing} did not start within {timeout_s:.0f}s")
            if message[0] == "failed":
                self._transport.kill()
                raise GroupFailedError(f"rank {message[1]} failed to start: {message[2]}")
            ready[message[1]] = message[2]
        return [ready[r] for r in range(self.world_size)]

    def _pick_rank(self, size: int) -> int:
        if not self.healthy:
            raise GroupFailedError(f"the expert-parallel group is down: {self.error}")
        with self._lock:
            load = [0] * self.world_size  # tokens the rank's open requests may occupy
            for rank, tokens in self._owner.values():
                load[rank] += tokens
            return min(range(self.world_size), key=lambda r: (load[r], r))

    def _open(self, request_id: str, rank: int, size: int) -> asyncio.Queue:
        q = self._streams.open(request_id)
        with self._lock:
            self._owner[request_id] = (rank, size)
        return q

    async def _stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self._streams.stream(request_id, q, self.abort):
                yield out
        finally:
            with self._lock:
                self._owner.pop(request_id, None)

    def _deliver(self, request_id: str, item) -> None:
        self._streams.deliver(request_id, item)

    def _relay_loop(self) -> None:
        last_watch = time.monotonic()
        while not self._stopping:
            try:
                message = self._transport.receive(0.2)
            except (EOFError, OSError):
                return
            if message is not None:
                self._handle(message)
            elif self.error is None and time.monotonic() - last_watch > self._watch_every_s:
                last_watch = time.monotonic()
                dead = self._transport.dead_rank()
                if dead is not None:
                    self._fail(dead)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            for out in message[2]:
                self._deliver(out.request_id, out)
        elif kind == "rejected":
            _, _, request_id, field, text = message
            self._deliver(request_id, RequestError(field, text.split(": ", 1)[-1]))
        elif kind == "lost":  # a hand-off's latents could not be read from its prefill rank
            _, _, request_id, text = message
            self._deliver(request_id, KVTransferError(text))
        elif kind == "rebalanced":  # a rank uses the placement of this epoch (and of every earlier one)
            _, rank, epoch, changed = message
            with self._lock:
                waiting = [q for e, q in self._rebalancing.items() if e <= epoch]
            for q in waiting:
                q.put((rank, changed))
        elif kind == "reply":
            for reply in list(self._replies.values()):
                reply.put((message[1], message[2]))
        elif kind == "failed":
            self._fail(message[2])

    def _fail(self, error: str) -> None:
        """A rank is gone: end every open request with an error now, and stop the others."""
        if self.error is None:
            self.error = error
            log.error("expert-parallel group failed: %s", error)
        self._end_rebalances()
        for request_id in self._streams.open_ids():
            self._deliver(request_id, RequestOutput(request_id, finished=True, finish_reason="error",
                                                     error=f"expert-parallel group failed: {error}"))
        self._transport.kill()

