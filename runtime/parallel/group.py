"""An expert-parallel group of rank processes behind the EngineClient interface."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
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

from .layout import Failover, GroupConfig, free_tcp_address
from .placement import regrown_placement
from .rank import RankSpec
from .transport import Direct, ProcessTransport, RankTransport, RayTransport, rank0_address

log = logging.getLogger(__name__)


class GroupFailedError(EngineUnavailableError):
    """A rank died or a collective failed: the group serves nothing more."""


def rank_specs(checkpoint: str, world_size: int, *, engine: EngineConfig, dtype: str, device: str,
               redundant: int, timeout_s: float, address: str | None = None,
               options: dict[str, Any] | None = None, failover: Failover = Failover(),
               expert_load: dict[int, list[float]] | None = None, weights: str = "dequantized") -> list[RankSpec]:
    address = address or free_tcp_address()
    return [RankSpec(GroupConfig(world_size, rank, address, timeout_s=timeout_s), checkpoint, engine, dtype, device,
                     redundant, dict(options or {}), failover, expert_load, weights=weights)
            for rank in range(world_size)]


@dataclass
class _Tracked:
    """What a request's rank was asked, and what of it has streamed: enough to start it again elsewhere."""

    command: tuple
    token_ids: list[int] = field(default_factory=list)
    generator_state: Any = None
    finished: bool = False

    def restart(self) -> tuple:
        """The command that continues the request on another rank: unchanged if nothing streamed yet, else its
        prompt plus every token streamed so far, computed again (a decode rank too: the latents are gone)."""
        if not self.token_ids:
            return self.command
        if self.command[0] == "handoff":
            handoff = self.command[1]
            request_id, prompt, params, resumed = (handoff.request_id, handoff.prompt_token_ids, handoff.params,
                                                   handoff.resumed_token_ids)
            started_from = handoff.generator_state  # after the prefill rank drew the first token
        else:
            _, request_id, prompt, params, resumed, *rest = self.command
            started_from = rest[0] if rest else None
        generator_state = self.generator_state if self.generator_state is not None else started_from
        return ("add", request_id, list(prompt), params, tuple(resumed) + tuple(self.token_ids), generator_state)


@dataclass
class Reform:
    """The survivors of a lost rank forming their next group. Collecting: every member is either reported
    broken (alive, with an address to meet at) or known dead, or the deadline passes. Then sent: the survivors
    are told to form `generation` and each says when it serves in it."""

    started: float
    deadline: float
    dead: dict[int, str] = field(default_factory=dict)
    broken: dict[int, str] = field(default_factory=dict)  # rank -> address it offers
    generations: dict[int, int] = field(default_factory=dict)  # rank -> the group it served in
    errors: list[str] = field(default_factory=list)
    generation: int | None = None  # set once sent
    sent: float = 0.0
    members: tuple[int, ...] = ()
    formed: dict[int, int] = field(default_factory=dict)  # rank -> experts it loaded


@dataclass
class Grow:
    """A degraded group growing back: the lost ranks respawned in their places, each building its model, then
    (once all are ready) the survivors told to switch to the larger group; each rank says when it serves in it."""

    started: float
    generation: int
    joiners: tuple[int, ...]
    members: tuple[int, ...]
    ready: dict[int, int] = field(default_factory=dict)  # joiner -> expert bytes it holds
    failed: str | None = None
    woken: threading.Event = field(default_factory=threading.Event)
    sent: float = 0.0
    formed: dict[int, int] = field(default_factory=dict)  # rank -> experts it loaded


class ExpertParallelGroup:
    """`world_size` rank processes that together hold every expert; attention is data-parallel, so each
    request lives on one rank, chosen as the least loaded. One thread relays the ranks' outputs to the
    waiting callers and watches the processes. A rank that dies fails every request (Failover restart), or the
    group goes on without it (degrade) and, every `grow_back_interval_s`, tries to start it again in its place and
    grow back to its full size."""

    def __init__(self, transport: RankTransport, *, start_timeout_s: float = 300.0, watch_every_s: float = 1.0,
                 rebalance_interval_s: float | None = None, failover: Failover = Failover(),
                 collective_timeout_s: float = 60.0, grow_back_interval_s: float | None = 30.0):
        self._transport = transport
        self.world_size = transport.world_size
        self.members: list[int] = list(range(self.world_size))  # ranks alive, in the order of their group
        self.failover = failover
        self._collective_timeout_s = collective_timeout_s
        self._start_timeout_s = start_timeout_s
        self._reform: Reform | None = None
        self._generation = 0
        self.reforms: list[dict[str, Any]] = []  # each time the group went on without a lost rank
        self._grow: Grow | None = None
        self.regrowths: list[dict[str, Any]] = []  # each time it grew back
        # Respawned ranks lost before they joined: survivors that had switched to the larger group report broken,
        # and the group they form again is without these.
        self._lost_joiners: dict[int, str] = {}
        self._grow_back_interval_s = grow_back_interval_s
        self._regrow_not_before = 0.0  # a try waits one interval after the group went on without a rank
        self._requests: dict[str, _Tracked] = {}
        self.error: str | None = None
        self._watch_every_s = watch_every_s
        self._stopping = False
        self.expert_bytes = self._await_ready(start_timeout_s)
        self._streams = StreamRelay()
        self._owner: dict[str, tuple[int, int]] = {}  # request id -> (rank, tokens it may occupy)
        self._replies: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._last_epoch = 0  # the newest rebalance asked of the ranks
        self._rebalancing: dict[int, queue.Queue] = {}
        self._relay_thread = threading.Thread(target=self._relay_loop, name="r1serve-ep-relay", daemon=True)
        self._relay_thread.start()
        if rebalance_interval_s is not None and self.world_size > 1:  # experts.rebalanceIntervalSeconds
            threading.Thread(target=self._rebalance_on_schedule, args=(rebalance_interval_s,), daemon=True,
                             name="r1serve-ep-rebalance").start()
        if grow_back_interval_s is not None and self.world_size > 1 and failover.degrades:
            threading.Thread(target=self._grow_back_on_schedule, args=(grow_back_interval_s,), daemon=True,
                             name="r1serve-ep-regrow").start()

    @classmethod
    def in_processes(cls, checkpoint: str, world_size: int, *, engine: EngineConfig = EngineConfig(),
                     dtype: str = "float32", device: str = "cpu", redundant: int = 0, timeout_s: float = 30.0,
                     start_timeout_s: float = 300.0, rebalance_interval_s: float | None = None,
                     options: dict[str, Any] | None = None, failover: Failover = Failover(),
                     expert_load: dict[int, list[float]] | None = None,
                     grow_back_interval_s: float | None = 30.0, weights: str = "dequantized") -> ExpertParallelGroup:
        """A group of local processes (one machine, no Ray): tests, benchmarks, the offline CLI. `expert_load`:
        kept load to start from (see RankSpec)."""
        return cls(ProcessTransport(rank_specs(checkpoint, world_size, engine=engine, dtype=dtype, device=device,
                                               redundant=redundant, timeout_s=timeout_s, options=options,
                                               failover=failover, expert_load=expert_load, weights=weights)),
                   start_timeout_s=start_timeout_s, rebalance_interval_s=rebalance_interval_s, failover=failover,
                   collective_timeout_s=timeout_s, grow_back_interval_s=grow_back_interval_s)

    @classmethod
    def on_ray(cls, checkpoint: str, bundles: list[dict[str, float]], *, engine: EngineConfig, dtype: str,
               device: str, redundant: int, placement_group=None, timeout_s: float = 60.0,
               direct: Direct | None = None,
               rebalance_interval_s: float | None = None, failover: Failover = Failover(),
               expert_load: dict[int, list[float]] | None = None,
               grow_back_interval_s: float | None = 30.0, weights: str = "dequantized") -> ExpertParallelGroup:
        """One rank per bundle, as Ray actors in bundles 1..N of `placement_group` (a Serve replica's own,
        whose bundle 0 is the replica); without one the ranks are scheduled freely. With `direct`, hand-offs
        move rank to rank."""
        address = rank0_address(placement_group, max(timeout_s, 60.0))  # scheduling the probe may take a while
        specs = rank_specs(checkpoint, len(bundles), engine=engine, dtype=dtype, device=device,
                           redundant=redundant, timeout_s=timeout_s, address=address, failover=failover,
                           expert_load=expert_load, weights=weights)
        log.info("starting %d %s ranks at %s", len(bundles), engine.role, address)
        # A rank's commands may wait on a hand-off read (bounded by its own timeout) before a probe is answered.
        unanswered_s = timeout_s + (direct.timeout_s if direct is not None else 0.0)
        return cls(RayTransport(specs, bundles, placement_group=placement_group, direct=direct,
                                unanswered_s=unanswered_s),
                   rebalance_interval_s=rebalance_interval_s, failover=failover, collective_timeout_s=timeout_s,
                   grow_back_interval_s=grow_back_interval_s)

    # -- EngineClient ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       resumed: tuple[int, ...] = ()) -> AsyncIterator[RequestOutput]:
        size = len(prompt_token_ids) + params.max_tokens
        command = ("add", request_id, list(prompt_token_ids), params, tuple(resumed))
        q, rank = self._open(request_id, size, command)
        self._transport.send(rank, command)
        async for out in self._stream(request_id, q):
            yield out

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      resumed: tuple[int, ...] = ()) -> RequestOutput:
        return await last_output(self.generate(request_id, prompt_token_ids, params, resumed))

    async def generate_from_handoff(self, handoff: KVHandoff) -> AsyncIterator[RequestOutput]:
        size = len(handoff.prompt_token_ids) + handoff.params.max_tokens
        command = ("handoff", handoff)
        q, rank = self._open(handoff.request_id, size, command)
        self._transport.send(rank, command)
        async for out in self._stream(handoff.request_id, q):
            yield out

    async def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            self._transport.send(owner[0], ("abort", request_id))

    def stats(self) -> EngineStats:
        """The group's totals (summed over ranks; a flag is set when any rank's is), and its ranks alive of
        those it started with."""
        per_rank = self.rank_stats()
        first = per_rank[0]
        combined = {f: (any if isinstance(getattr(first, f), bool) else sum)(getattr(s, f) for s in per_rank)
                    for f in first.__dataclass_fields__ if f != "role"}
        combined.update(ranks=self.world_size, ranks_alive=len(self._serving_ranks()))
        return replace(first, **combined)

    def describe(self) -> dict[str, str]:
        """Rank 0's description (every rank runs the same paths), with the group's size."""
        per_rank = self._ask_every_rank("describe", 30.0)
        return {**per_rank[0], "ranks": str(len(per_rank))}

    def rank_stats(self, timeout_s: float = 30.0) -> list[EngineStats]:
        return self._ask_every_rank("stats", timeout_s)

    def placements(self, timeout_s: float = 30.0) -> list[dict[int, tuple[int, ...]]]:
        """Per rank alive: MoE layer -> physical_to_logical (every rank holds the same view)."""
        return self._ask_every_rank("placements", timeout_s)

    def expert_load(self, timeout_s: float = 30.0) -> dict[int, list[int]]:
        """Token copies routed to each logical expert so far, per MoE layer, summed over the ranks alive."""
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
        self._replies[token] = reply
        try:
            asked: set[int] = set()
            results: dict[int, Any] = {}
            deadline = time.monotonic() + timeout_s
            # Until every rank still serving answered: one the group goes on without meanwhile is not waited for,
            # and one that starts serving meanwhile (it joined as the group grew back) is asked too.
            while not set(self._serving_ranks()) <= set(results):
                for rank in set(self._serving_ranks()) - asked:
                    self._transport.send(rank, ("ask", token, command, *args))
                    asked.add(rank)
                if not self.healthy:
                    raise GroupFailedError(f"the expert-parallel group is down: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    silent = sorted(set(self._serving_ranks()) - set(results))
                    raise GroupFailedError(f"ranks {silent} did not answer {command!r} within {timeout_s:.0f}s")
                try:
                    rank, answer = reply.get(timeout=min(0.5, left))
                except queue.Empty:
                    continue
                results[rank] = answer
        finally:
            self._replies.pop(token, None)
        serving = set(self._serving_ranks())
        return [results[rank] for rank in sorted(results) if rank in serving]

    def rebalance(self, timeout_s: float = 300.0) -> bool:
        """Rebalance experts from the load seen so far; returns once every rank uses the new placement (True)
        or kept its own because nothing would change (False; also when the group lost a rank meanwhile, whose
        re-forming placed the experts instead). The ranks agree on one epoch per call: a rank that hears of it
        late does not rebalance a second time."""
        if not self.healthy:
            raise GroupFailedError(f"the expert-parallel group is down: {self.error}")
        done: queue.Queue = queue.Queue()
        with self._lock:
            self._last_epoch += 1
            epoch = self._last_epoch
            self._rebalancing[epoch] = done
            members = self._serving_ranks()
        try:
            for rank in members:
                self._transport.send(rank, ("rebalance", epoch))
            deadline = time.monotonic() + timeout_s
            answers: dict[int, bool] = {}
            while len(answers) < len(members):
                rank, changed = done.get(timeout=max(0.0, deadline - time.monotonic()))
                if rank is None:  # the group failed, stopped or lost a rank meanwhile
                    if self.error is not None or self._stopping:
                        raise GroupFailedError(f"rebalance {epoch} did not finish: the expert-parallel group is "
                                               f"down: {self.error or 'shutting down'}")
                    return False
                answers[rank] = changed
        except queue.Empty:
            raise GroupFailedError(f"ranks did not finish rebalance {epoch} within {timeout_s:.0f}s") from None
        finally:
            with self._lock:
                self._rebalancing.pop(epoch, None)
        return any(answers.values())

    def _end_rebalances(self) -> None:
        """Wake every rebalance waiting for ranks that will not answer."""
        with self._lock:
            waiting = list(self._rebalancing.values())
        for q in waiting:
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
            if message[0] in ("failed", "dead"):
                self._transport.kill()
                raise GroupFailedError(f"rank {message[1]} failed to start: {message[2]}")
            ready[message[1]] = message[2]
        return [ready[r] for r in range(self.world_size)]

    def _serving_ranks(self) -> list[int]:
        """Members not known to be lost (while a group forms, the dead ones it knows of are left out), nor still
        joining as the group grows back."""
        reform, grow = self._reform, self._grow
        return [r for r in self.members
                if (reform is None or r not in reform.dead) and (grow is None or r not in grow.joiners)]

    def _least_loaded(self, size: int) -> int:
        load = dict.fromkeys(self._serving_ranks(), 0)  # tokens the rank's open requests may occupy
        if not load:
            raise GroupFailedError("no rank of the expert-parallel group is serving")
        for rank, tokens in self._owner.values():
            if rank in load:
                load[rank] += tokens
        return min(load, key=lambda r: (load[r], r))

    def _open(self, request_id: str, size: int, command: tuple) -> tuple[asyncio.Queue, int]:
        if not self.healthy:
            raise GroupFailedError(f"the expert-parallel group is down: {self.error}")
        q = self._streams.open(request_id)
        with self._lock:
            rank = self._least_loaded(size)
            self._owner[request_id] = (rank, size)
            self._requests[request_id] = _Tracked(command)
        return q, rank

    async def _stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self._streams.stream(request_id, q, self.abort):
                yield out
        finally:
            with self._lock:
                owner = self._owner.pop(request_id, None)
                tracked = self._requests.pop(request_id, None)
                if owner is not None and tracked is not None and not tracked.finished and self.healthy:
                    # The caller left before the end: the rank that has the request now (it may have moved
                    # since an earlier abort went out) stops it.
                    self._transport.send(owner[0], ("abort", request_id))

    def _deliver(self, request_id: str, item) -> None:
        self._streams.deliver(request_id, item)

    def _relay_loop(self) -> None:
        last_watch = time.monotonic()
        while not self._stopping:
            try:
                message = self._transport.receive(0.2)
            except (EOFError, OSError):
                return
            try:
                if message is not None:
                    self._handle(message)
                if self.error is None and time.monotonic() - last_watch > self._watch_every_s:
                    last_watch = time.monotonic()
                    dead = {r: why for r, why in self._transport.dead_ranks().items() if r in self.members}
                    if dead:
                        self._rank_lost(dead)
                    if self._reform is not None:
                        self._advance_reform()
            except Exception as exc:  # noqa: BLE001 - the group cannot go on unwatched: it fails, clearly
                log.exception("the expert-parallel group's relay failed")
                self._fail(f"the group's relay failed: {type(exc).__name__}: {exc}")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            for out in message[2]:
                if self._moved_from(message[1], out.request_id):
                    continue  # read after its request moved on: the new rank computes these tokens again
                self._note(out)
                self._deliver(out.request_id, out)
        elif kind == "rejected":
            _, rank, request_id, field_name, text = message
            if not self._moved_from(rank, request_id):
                self._deliver(request_id, RequestError(field_name, text.split(": ", 1)[-1]))
        elif kind == "lost":  # a hand-off's latents could not be read from its prefill rank
            _, rank, request_id, text = message
            if not self._moved_from(rank, request_id):
                self._deliver(request_id, KVTransferError(text))
        elif kind == "rebalanced":  # a rank uses the placement of this epoch (and of every earlier one)
            _, rank, epoch, changed = message
            with self._lock:
                waiting = [q for e, q in self._rebalancing.items() if e <= epoch]
            for q in waiting:
                q.put((rank, changed))
        elif kind == "reply":  # ("reply", rank, answer, token): to the question it answers, if still asked
            reply = self._replies.get(message[3]) if len(message) > 3 else None
            if reply is not None:
                reply.put((message[1], message[2]))
        elif kind == "broken":  # a rank's collective failed; it waits to form a group without the lost rank
            self._rank_broken(*message[1:])
        elif kind == "reformed":
            self._rank_reformed(*message[1:])
        elif kind == "grow-failed":  # a survivor could not read the experts it would hold: stay as we are
            grow = self._grow
            if grow is not None and grow.generation == message[2] and grow.sent:
                self._abandon_grow(grow, dict.fromkeys(grow.joiners, message[3]))
        elif kind == "ready":  # a respawned rank built its model and waits to join
            grow = self._grow
            if grow is not None and message[1] in grow.joiners:
                grow.ready[message[1]] = message[2]
                grow.woken.set()
        elif kind == "dead":
            if message[1] in self.members:
                self._rank_lost({message[1]: message[2]})
        elif kind == "failed":
            grow = self._grow
            if grow is not None and message[1] in grow.joiners:  # a respawned rank: the group goes on without it
                grow.failed = message[2]
                grow.woken.set()
                if message[1] in self.members:
                    self._transport.kill_rank(message[1])
                    self._rank_lost({message[1]: message[2]})
            elif message[1] in self.members:  # not a rank the group already went on without
                self._fail(message[2])

    def _moved_from(self, rank: int, request_id: str) -> bool:
        owner = self._owner.get(request_id)
        return owner is not None and owner[0] != rank

    def _note(self, out: RequestOutput) -> None:
        """Keep what a request streamed (and its generator), to continue it elsewhere if its rank is lost."""
        tracked = self._requests.get(out.request_id)
        if tracked is not None:
            tracked.finished = tracked.finished or out.finished
            tracked.token_ids.extend(out.token_ids)
            if out.generator_state is not None:
                tracked.generator_state = out.generator_state
        out.generator_state = None  # the group's own business: never sent on

    # -- losing a rank -----------------------------------------------------------------------------

    def _rank_lost(self, dead: dict[int, str]) -> None:
        if self.error is not None or self._stopping:
            return
        grow = self._grow
        if grow is not None and grow.sent:  # any loss while the group grows: it does not grow this time
            self._abandon_grow(grow, dead)
            dead = {r: why for r, why in dead.items() if r not in grow.joiners}
            if not dead:
                return
        if not self.failover.degrades or len(self.members) < 2:
            self._fail(next(iter(dead.values())))
            return
        reform = self._collecting()
        fresh = {r: why for r, why in dead.items() if r not in reform.dead}
        if fresh:
            log.warning("expert-parallel group lost %s", "; ".join(fresh.values()))
            reform.dead.update(fresh)
            for rank in fresh:  # one taken for dead (its commands are stuck) must be: the others go on without it
                self._transport.kill_rank(rank)
            self._advance_reform()

    def _rank_broken(self, rank: int, generation: int, error: str, address: str) -> None:
        if self.error is not None or self._stopping:
            return
        if rank not in self.members:
            return  # a rank the group already went on without
        if not self.failover.degrades:
            self._fail(error)
            return
        grow = self._grow
        if grow is not None and grow.sent and rank not in grow.joiners:  # the larger group broke, or never formed
            self._abandon_grow(grow, {rank: error})
        reform = self._collecting()
        reform.broken[rank] = address
        reform.generations[rank] = generation
        reform.errors.append(error)
        self._advance_reform()

    def _collecting(self) -> Reform:
        """The reform that is collecting reports; a new one if none is, or if the last was already sent (then
        forming that group failed: a rank was lost while it formed)."""
        with self._lock:  # the grow-back thread checks for a reform under it before it sends a grow
            if self._reform is None or self._reform.generation is not None:
                now = time.monotonic()
                # Every survivor reports once its collective fails: at once for a peer that died, within the
                # collective timeout for one that stopped answering.
                self._reform = Reform(started=now if self._reform is None else self._reform.started,
                                      deadline=now + self._collective_timeout_s + 10.0,
                                      dead=dict(self._lost_joiners))
                self._lost_joiners = {}
            return self._reform

    def _advance_reform(self) -> None:
        reform = self._reform
        if reform is None or self.error is not None:
            return
        if reform.generation is not None:  # sent: waiting for the survivors to serve in it
            if time.monotonic() > reform.deadline:
                self._fail(f"the surviving ranks {list(reform.members)} did not form a group within "
                           f"{self._start_timeout_s:.0f}s")
            return
        waiting = [r for r in self.members if r not in reform.dead and r not in reform.broken]
        if waiting and time.monotonic() < reform.deadline:
            return
        for rank in waiting:  # alive but silent past the deadline: stuck, and taken for dead
            reform.dead[rank] = f"rank {rank} stopped answering"
            self._transport.kill_rank(rank)
        if not reform.dead:
            self._fail(f"every rank's collective failed but none was lost: {reform.errors[0]}")
            return
        survivors = tuple(r for r in self.members if r in reform.broken and r not in reform.dead)
        if not survivors:
            self._fail("no rank of the expert-parallel group survived: " + "; ".join(reform.dead.values()))
            return
        if len({reform.generations[r] for r in survivors}) > 1:  # their placements may differ: unsafe to go on
            self._fail(f"the surviving ranks served in different groups ({reform.generations}): a rank was lost "
                       "while the group formed")
            return
        with self._lock:  # the grow-back thread numbers groups too
            self._generation += 1
            generation = self._generation
        self._grow = None  # a grow under way, if any, is over: this group forms without its lost ranks
        reform.generation, reform.members, reform.sent = generation, survivors, time.monotonic()
        reform.deadline = time.monotonic() + self._start_timeout_s
        address = reform.broken[survivors[0]]
        log.warning("expert-parallel group forms again with ranks %s of %d (lost: %s)", list(survivors),
                    self.world_size, "; ".join(reform.dead.values()))
        with self._lock:
            epoch = self._last_epoch
            lost = set(self.members) - set(survivors)
            self.members = list(survivors)
            moved = [rid for rid, (rank, _) in self._owner.items() if rank in lost]
        self._end_rebalances()  # the re-forming places the experts; a rebalance under way is dropped
        for rank in survivors:
            self._transport.send(rank, ("reform", reform.generation, survivors, address, epoch))
        for request_id in moved:  # queued on a survivor: it runs them once the group serves again
            with self._lock:  # with the owner, so a caller that leaves meanwhile aborts it where it went
                tracked = self._requests.get(request_id)
                owner = self._owner.get(request_id)
                if tracked is None or owner is None or tracked.finished:
                    continue  # ended meanwhile
                rank = self._least_loaded(owner[1])
                self._owner[request_id] = (rank, owner[1])
                self._transport.send(rank, tracked.restart())
            log.info("request %s continues on rank %d after %d streamed tokens", request_id, rank,
                     len(tracked.token_ids))

    def _rank_reformed(self, rank: int, generation: int, loaded: int) -> None:
        grow = self._grow
        if grow is not None and grow.generation == generation:
            grow.formed[rank] = loaded
            if set(grow.formed) == set(grow.members):
                now = time.monotonic()
                record = {"generation": generation, "ranks": list(grow.members), "joined": list(grow.joiners),
                          "seconds": now - grow.started, "starting_seconds": grow.sent - grow.started,
                          "switching_seconds": now - grow.sent, "experts_loaded": sum(grow.formed.values()),
                          "sent_at": grow.sent, "served_at": now}
                self.regrowths.append(record)
                self._grow = None
                self._end_rebalances()  # one asked meanwhile was dropped at the switch
                log.warning("expert-parallel group grew back to %d ranks in %.2fs (%.2fs to switch)",
                            len(grow.members), record["seconds"], record["switching_seconds"])
            return
        reform = self._reform
        if reform is None or reform.generation != generation:
            return
        reform.formed[rank] = loaded
        if set(reform.formed) == set(reform.members):
            now = time.monotonic()
            # From the first sign of the loss: every survivor reporting (a survivor waiting on a peer that broke
            # off waits out its collective timeout), then forming the group and loading the lost experts.
            record = {"generation": generation, "ranks": list(reform.members), "lost": dict(reform.dead),
                      "seconds": now - reform.started, "reporting_seconds": reform.sent - reform.started,
                      "forming_seconds": now - reform.sent,
                      "experts_loaded": sum(reform.formed.values()), "detected_at": reform.started,
                      "served_at": now}
            self.reforms.append(record)
            self._reform = None
            if self._grow_back_interval_s is not None:
                self._regrow_not_before = max(self._regrow_not_before, now + self._grow_back_interval_s)
            log.warning("expert-parallel group serves again with %d of %d ranks after %.2fs",
                        len(reform.members), self.world_size, record["seconds"])

    # -- growing back ------------------------------------------------------------------------------

    def _grow_back_on_schedule(self, every_s: float) -> None:
        """From one interval after a loss on, every `every_s`: start the lost ranks again where they were."""
        while not self._stopping and self.error is None:
            time.sleep(min(every_s, 1.0))
            lost = [r for r in range(self.world_size) if r not in self.members]
            if (not lost or self._reform is not None or self._grow is not None or self._stopping or self.error
                    or time.monotonic() < self._regrow_not_before):
                continue
            try:
                self._grow_back(lost)
            except Exception as exc:  # noqa: BLE001 - the group serves on degraded and tries again later
                log.warning("the expert-parallel group could not grow back ranks %s yet: %s", lost, exc)
                self._regrow_not_before = max(self._regrow_not_before, time.monotonic() + every_s)

    def _grow_back(self, lost: list[int]) -> None:
        """Start the lost ranks again in their places, each with its part of a placement balanced over the full
        group; once all have built their models, tell the survivors to switch. Raises (and stops the respawned
        ranks) when a place cannot be scheduled, a respawned rank fails, or the group lost a rank meanwhile."""
        started = time.monotonic()
        address = self._transport.address_for(lost[0], min(self._start_timeout_s, 60.0))  # it leads
        base = self._transport.specs[0]
        placements = {layer: regrown_placement(load, self.world_size, base.redundant).physical_to_logical
                      for layer, load in self.expert_load().items()}
        self._lost_joiners = {}  # every survivor answered: none is still stuck joining an earlier try
        members = tuple(lost) + tuple(self.members)
        with self._lock:
            self._generation += 1
            grow = self._grow = Grow(started, self._generation, tuple(lost), members)
        try:
            for position, rank in enumerate(lost):
                spec = self._transport.specs[rank]
                self._transport.respawn(rank, replace(
                    spec, group=replace(spec.group, world_size=len(members), rank=position, init_method=address),
                    members=members, joins=grow.generation, placements=placements))
            deadline = time.monotonic() + self._start_timeout_s
            while set(grow.ready) != set(lost):
                dead = [why for r, why in self._transport.dead_ranks().items() if r in lost]
                problem = grow.failed or (dead and dead[0]) or (self._grow is not grow and "the group lost a rank")
                if problem or time.monotonic() > deadline:
                    raise GroupFailedError(problem or f"ranks {lost} did not start within {self._start_timeout_s:.0f}s")
                grow.woken.wait(0.5)
                grow.woken.clear()
            with self._lock:
                if self._grow is not grow or self._reform is not None or self.error or self._stopping:
                    raise GroupFailedError("the group lost a rank or stopped while ranks were respawned")
                epoch = self._last_epoch
                self.members = list(members)
                grow.sent = time.monotonic()
        except BaseException:
            if self._grow is grow:
                self._grow = None
            for rank in lost:
                self._transport.kill_rank(rank)
            raise
        self._end_rebalances()  # growing places the experts; a rebalance under way is dropped
        log.warning("expert-parallel group grows back to %d ranks: %s respawned", len(members), lost)
        for rank in members[len(lost):]:
            self._transport.send(rank, ("grow", grow.generation, members, address, epoch, placements))

    def _abandon_grow(self, grow: Grow, lost: dict[int, str]) -> None:
        """A rank was lost while the group grew (a respawned one before it joined, or a survivor): the
        respawned ranks are stopped and the survivors told to stay in their group. Those that switched already
        (all at one boundary, or none) cannot form the larger group and report broken; the group they form again
        is without the respawned ranks."""
        log.warning("expert-parallel group does not grow back: %s", "; ".join(lost.values()))
        survivors = grow.members[len(grow.joiners):]
        with self._lock:
            self.members = list(survivors)
            self._grow = None
            self._lost_joiners = {r: f"rank {r} was lost while it joined" for r in grow.joiners}
            # Survivors that had switched report broken within their collective timeout: no new try before.
            self._regrow_not_before = max(self._regrow_not_before,
                                          time.monotonic() + self._collective_timeout_s + 10.0)
        for rank in grow.joiners:
            self._transport.kill_rank(rank)
        for rank in survivors:
            self._transport.send(rank, ("grow-cancel", grow.generation))

    def _fail(self, error: str) -> None:
        """The group can serve nothing more: end every open request with an error now, and stop the ranks."""
        if self.error is None:
            self.error = error
            log.error("expert-parallel group failed: %s", error)
        self._end_rebalances()
        for request_id in self._streams.open_ids():
            self._deliver(request_id, RequestOutput(request_id, finished=True, finish_reason="error",
                                                     error=f"expert-parallel group failed: {error}"))
        self._transport.kill()
