"""Request routers for the pools, plugged into Serve's handles (request_router_config).

A replica whose engine failed says so in its stats and is chosen last (it fails what it gets, and a request
retried there would fail again until Serve's health check replaces it).

Prefill: least queued prompt tokens, where a replica that caches a prefix of the prompt is charged only
for the tokens it must still compute. Decode: least load (running plus waiting sequences, then KV-cache
use). Replicas publish their numbers through `record_routing_stats` every second; the router adds what it
sent since, so a burst of requests does not all land on the replica that looked idle a second ago. A request
is charged to its first choice as soon as it is chosen, not when the replica accepts it (Serve reports that
an RPC later), or a burst routed within that round trip would still pile onto one replica.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from r1serve.runtime.engine.block_manager import prefix_hashes

# Prefix hashes remembered per replica from requests this router sent (stats lag by up to a period).
RECENT_PREFIXES_PER_REPLICA = 4096
# A charge made when a replica is chosen lapses unless Serve reports it accepted within this long: a
# request cancelled or refused before being sent gets no completion callback. Choosing again (Serve
# does on every retry) charges it afresh; an accepted one is by then in the replica's own stats.
TENTATIVE_CHARGE_S = 2.0


@dataclass(frozen=True)
class Candidate:
    """One replica as the policy sees it: its published stats merged with this router's own in-flight work."""

    replica_id: Any
    queued_prompt_tokens: int = 0
    ongoing: int = 0  # running + waiting sequences
    kv_usage: float = 0.0
    cached_blocks: int = 0  # leading blocks of this prompt the replica holds
    healthy: bool = True  # False: its engine failed; it is chosen only when nothing else is left


def prefill_order(candidates: list[Candidate], prompt_len: int, block_size: int) -> list[Candidate]:
    """Best first: fewest prompt tokens to compute before this one finishes, counting cache hits."""
    def cost(c: Candidate) -> tuple:
        uncached = max(prompt_len - c.cached_blocks * block_size, 0)
        return (not c.healthy, c.queued_prompt_tokens + uncached, c.ongoing, random.random())
    return sorted(candidates, key=cost)


def decode_order(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: fewest running plus waiting sequences, then the emptiest KV cache."""
    return sorted(candidates, key=lambda c: (not c.healthy, c.ongoing, c.kv_usage, random.random()))


def matched_blocks(hashes: list[int], cached: Iterable[set[int]]) -> int:
    """How many leading blocks of a prompt (given as chained hashes) any of the sets holds."""
    sets = list(cached)
    n = 0
    for h in hashes:
        if not any(h in s for s in sets):
            break
        n += 1
    return n


@dataclass
class _Tracker:
    """What this router sent to each replica and has not seen complete."""

    inflight: dict[str, tuple[Any, int]] = field(default_factory=dict)  # internal id -> (replica, tokens)
    tokens: dict[Any, int] = field(default_factory=dict)
    requests: dict[Any, int] = field(default_factory=dict)
    prefixes: dict[Any, OrderedDict] = field(default_factory=dict)
    tentative: dict[str, float] = field(default_factory=dict)  # internal id -> when the charge lapses

    def add(self, request_id: str, replica: Any, tokens: int, hashes: list[int], *,
            lapses_at: float | None = None) -> None:
        """Charge the request to `replica`; charged before (to its first choice), it moves. A charge
        with `lapses_at` is tentative: `expire` drops it after that time unless added again firmly."""
        self.done(request_id)
        if lapses_at is not None:
            self.tentative[request_id] = lapses_at
        self.inflight[request_id] = (replica, tokens)
        self.tokens[replica] = self.tokens.get(replica, 0) + tokens
        self.requests[replica] = self.requests.get(replica, 0) + 1
        recent = self.prefixes.setdefault(replica, OrderedDict())
        for h in hashes:
            recent[h] = None
            recent.move_to_end(h)
        while len(recent) > RECENT_PREFIXES_PER_REPLICA:
            recent.popitem(last=False)

    def expire(self, now: float) -> None:
        for request_id in [r for r, t in self.tentative.items() if t <= now]:
            self.done(request_id)

    def done(self, request_id: str) -> None:
        self.tentative.pop(request_id, None)
        entry = self.inflight.pop(request_id, None)
        if entry is not None:
            replica, tokens = entry
            self.tokens[replica] -= tokens
            self.requests[replica] -= 1

    def forget(self, replica: Any) -> None:
        for key in [k for k, (r, _) in self.inflight.items() if r == replica]:
            self.done(key)
        for table in (self.tokens, self.requests, self.prefixes):
            table.pop(replica, None)


def _prompt_of(pending: PendingRequest | None) -> list[int]:
    arg = pending.args[0] if pending is not None and pending.args else None
    return list(getattr(arg, "prompt_token_ids", None) or [])


class _PoolRouter(RequestRouter):
    """Shared plumbing: bookkeeping hooks, one replica per rank so Serve tries them in our order."""

    def initialize_state(self, **kwargs) -> None:
        self._tracker = _Tracker()

    def _candidates(self, replicas: list[RunningReplica], hashes: list[int]) -> list[Candidate]:
        self._tracker.expire(time.monotonic())  # charges of requests never sent weigh on no choice
        return [self._candidate(r, hashes) for r in replicas]

    def _candidate(self, replica: RunningReplica, hashes: list[int]) -> Candidate:
        stats = replica.routing_stats or {}
        rid = replica.replica_id
        published = set(stats.get("prefix_hashes") or ())
        recent = self._tracker.prefixes.get(rid, {}).keys()
        return Candidate(
            replica_id=rid,
            queued_prompt_tokens=max(int(stats.get("queued_prompt_tokens", 0)), self._tracker.tokens.get(rid, 0)),
            ongoing=max(int(stats.get("running", 0)) + int(stats.get("waiting", 0)),
                        self._tracker.requests.get(rid, 0)),
            kv_usage=float(stats.get("kv_usage", 0.0)),
            cached_blocks=matched_blocks(hashes, [published, set(recent)]) if hashes else 0,
            healthy=bool(stats.get("healthy", True)),
        )

    def _ranks(self, ordered: list[Candidate], replicas: list[RunningReplica],
               pending: PendingRequest | None) -> list[list[RunningReplica]]:
        if pending is not None:
            pending.routing_context.should_backoff = True  # all full: back off instead of spinning
            if ordered:
                self._charge(pending, ordered[0].replica_id, [], tentative=True)
        by_id = {r.replica_id: r for r in replicas}
        return [[by_id[c.replica_id]] for c in ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        prompt = _prompt_of(pending_request)
        block_size = self._block_size(replica_id)
        self._charge(pending_request, replica_id, prefix_hashes(prompt, block_size) if prompt and block_size else [])

    def _charge(self, pending: PendingRequest, replica_id: ReplicaID, hashes: list[int], *,
                tentative: bool = False) -> None:
        arg = pending.args[0] if pending.args else None
        tokens = len(_prompt_of(pending)) or int(getattr(arg, "num_prompt_tokens", 0) or 0)
        lapses_at = time.monotonic() + TENTATIVE_CHARGE_S if tentative else None
        self._tracker.add(pending.metadata.internal_request_id, replica_id, tokens, hashes, lapses_at=lapses_at)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._tracker.done(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._tracker.forget(replica_id)
        super().on_replica_actor_died(replica_id)

    def _block_size(self, replica_id: ReplicaID) -> int:
        replica = self._replicas.get(replica_id)
        return int((replica.routing_stats or {}).get("block_size", 0)) if replica is not None else 0


class PrefillRouter(_PoolRouter):
    """Least queued prompt tokens, with prefix-cache affinity."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        prompt = _prompt_of(pending_request)
        block_size = max((int((r.routing_stats or {}).get("block_size", 0)) for r in candidate_replicas), default=0)
        hashes = prefix_hashes(prompt[:-1], block_size) if prompt and block_size else []
        candidates = self._candidates(candidate_replicas, hashes)
        ordered = prefill_order(candidates, len(prompt), block_size or 1)
        return self._ranks(ordered, candidate_replicas, pending_request)


class DecodeRouter(_PoolRouter):
    """Least loaded: running plus waiting sequences, then KV-cache use."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        candidates = self._candidates(candidate_replicas, [])
        return self._ranks(decode_order(candidates), candidate_replicas, pending_request)
