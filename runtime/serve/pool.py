"""A prefill or decode pool replica: one engine (one EP group) behind Serve, streaming RequestOutputs.

The same class serves three roles under two deployment names: PrefillServer (`prefill` → PrefillResult
with a KV hand-off ticket), DecodeServer (`generate_from_handoff`, or `generate` without disaggregation).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from r1serve.runtime.engine.description import format_engine
from r1serve.runtime.engine.outputs import RequestError, RequestOutput
from r1serve.runtime.engine.sampling import SamplingParamsError
from r1serve.spec import R1Deployment
from r1serve.spec.expert_load import encode as encode_load

from .checkpoint import ensure_checkpoint
from .connector import RANK_TO_RANK, HandoffTicket, make_connector
from .engine_factory import MODEL, EngineSource, make_engine_client
from .errors import EngineFailure, classify
from .kept_load import OFFER_EVERY_S, keep_locally, kept_load_path, mounted, worth_keeping
from .messages import PoolRequest, PrefillResult, merge_outputs, to_wire
from .metrics import PoolMetrics
from .pool_plan import PoolPlan
from .status_board import publish_drafts, publish_engine, publish_expert_load, publish_ranks
from .streams import coalesced

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 1.0
# Prefix hashes a replica publishes for the prefill router (the most recently cached blocks).
PUBLISHED_PREFIX_HASHES = 1024
# Each streamed message costs about 1.4 ms of CPU across the hops (replica, Ingress, proxy; measured on
# CPU, see benchmarks/README.md). A replica running at least half its maxRunningRequests is throughput-
# bound, so it sends each request's new tokens at most this often; below that, every token at once.
BUSY_STREAM_INTERVAL_S = 0.2
# After Serve's graceful shutdown (graceful_shutdown_timeout_s in the Serve config) the engine gets
# this long to finish what it still holds; a prefill replica then keeps its object store alive a
# little longer, since the decode replicas fetch its last KV hand-offs from it.
DRAIN_TIMEOUT_S = 60.0
DRAIN_POLL_S = 0.1
HANDOFF_GRACE_S = 5.0


class PoolServer:
    def __init__(self, plan: PoolPlan, deployment: R1Deployment, checkpoint: str,
                 source: EngineSource = MODEL):
        self.plan, self.deployment, self.role = plan, deployment, plan.engine_role
        path = Path(checkpoint)
        if source.kind == "model" and deployment.spec.model.is_tiny and not (path / "config.json").is_file():
            path = ensure_checkpoint(deployment.spec.model)  # a node the driver could not write to
        self.connector = make_connector(deployment, fault=source.kv_fault)
        hands_off = plan.engine_role != "both"
        direct = self.connector.name if hands_off and self.connector.name in RANK_TO_RANK else None
        self.engine = make_engine_client(plan, path, source, direct=direct)
        self._publish_engine(kv_connector=self.connector.name if hands_off else None)
        self.metrics = PoolMetrics(self.role)
        self._replica = _replica_name()
        self._offer_load_at = time.monotonic() + OFFER_EVERY_S
        self._degraded = False  # what the last metrics update saw
        self._drafts_published, self._drafts_at = 0, 0.0  # draft tokens the status board was last told of
        self._busy_at = max(1, plan.engine.max_running // 2)
        self._stream_interval = 0.0
        self._last_handoff = -HANDOFF_GRACE_S
        self._receiving = 0  # hand-offs taken and not yet producing: their latents are on the way
        # A thread, not a task: the constructor may run outside the replica's event loop.
        self._stopping = threading.Event()
        threading.Thread(target=self._publish_metrics, name="r1serve-pool-metrics", daemon=True).start()

    # -- requests ---------------------------------------------------------------------------------

    async def prefill(self, request: PoolRequest) -> PrefillResult:
        try:
            out = await self.engine.prefill(request.request_id, request.prompt_token_ids, request.params,
                                            request.resumed_token_ids)
        except (RequestError, SamplingParamsError) as exc:
            raise classify(exc) from None  # the engine's errors do not unpickle; ServeError does
        _raise_if_failed(out)
        if out.handoff is None:
            raise EngineFailure(f"{request.request_id}: prefill returned no KV hand-off")
        ticket = self.connector.send(out.handoff)
        self._last_handoff = time.monotonic()
        return PrefillResult(request.request_id, out.token_ids[0], out.prompt_tokens, out.cached_tokens, ticket)

    async def generate(self, request: PoolRequest) -> AsyncIterator[tuple]:
        """Streams outputs in wire form (messages.to_wire)."""
        source = self.engine.generate(request.request_id, request.prompt_token_ids, request.params,
                                      request.resumed_token_ids)
        async for out in _checked(source, lambda: self._stream_interval):
            yield out

    async def generate_from_handoff(self, ticket: HandoffTicket) -> AsyncIterator[tuple]:
        """Streams outputs in wire form (messages.to_wire), from the first token on."""
        started = time.monotonic()
        self._receiving += 1
        receiving = True
        try:
            handoff = await self.connector.receive(ticket)
            async for out in _checked(self.engine.generate_from_handoff(handoff), lambda: self._stream_interval):
                if receiving:
                    self._receiving, receiving = self._receiving - 1, False
                    self.metrics.handoff(self.connector.name, ticket.nbytes, time.monotonic() - started)
                yield out
        finally:
            if receiving:
                self._receiving -= 1

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    # -- observability ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The engine's stats (EngineStats as a dict, plus kv_usage and prefix_hit_rate) and the hand-offs this
        replica is receiving."""
        stats = self.engine.stats()
        return {**asdict(stats), "kv_usage": stats.kv_usage, "prefix_hit_rate": stats.prefix_hit_rate,
                "handoffs_receiving": self._receiving}

    def record_routing_stats(self) -> dict[str, Any]:
        if not self.engine.healthy:  # until Serve's health check replaces it, routers send it nothing
            return {"healthy": False, "block_size": self.plan.engine.block_size}
        stats = self.engine.stats()
        return {
            "healthy": True,
            "queued_prompt_tokens": stats.queued_prompt_tokens,
            "running": stats.running,
            "waiting": stats.waiting,
            "kv_usage": round(stats.kv_usage, 3),
            "block_size": self.plan.engine.block_size,
            "prefix_hashes": self.engine.cached_prefix_hashes(PUBLISHED_PREFIX_HASHES) if self.role != "decode" else [],
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self.engine.stats()
        return {
            "queued_prompt_tokens": float(stats.queued_prompt_tokens),
            "ongoing_requests": float(stats.running + stats.waiting),
            "kv_cache_usage": float(stats.kv_usage),
        }

    def check_health(self) -> None:
        if not self.engine.healthy:
            raise EngineFailure(f"the {self.role} engine stopped: {getattr(self.engine, 'error', None)!r}")

    async def __del__(self):
        # Serve calls this after its graceful shutdown has waited for the ongoing requests; the engine
        # may still hold sequences of requests whose callers went away: let them finish before stopping.
        await self.drain(DRAIN_TIMEOUT_S)
        # The last hand-offs live in this replica's object store until decode replicas fetch them.
        await asyncio.sleep(max(0.0, self._last_handoff + HANDOFF_GRACE_S - time.monotonic()))
        self._stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    async def drain(self, timeout_s: float) -> bool:
        """Waits until the engine runs and queues nothing (True), or `timeout_s` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while _busy(self.engine.stats()):
            if loop.time() >= deadline:
                log.warning("stopping the %s replica with sequences still running", self.role)
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    def _publish_metrics(self) -> None:
        while not self._stopping.wait(METRICS_INTERVAL_S):
            try:
                stats = self.engine.stats()
                self.metrics.update(stats)
                degraded = stats.ranks_alive < stats.ranks  # its expert-parallel group went on without a lost rank
                if degraded or self._degraded:  # and once more when it grew back
                    publish_ranks(self.plan.pool, self._replica, stats.ranks_alive, stats.ranks)
                self._degraded = degraded
                if stats.draft_tokens != self._drafts_published and time.monotonic() >= self._drafts_at:
                    self._drafts_at = time.monotonic() + OFFER_EVERY_S
                    self._drafts_published = stats.draft_tokens
                    publish_drafts(self.plan.pool, self._replica, stats.draft_tokens, stats.accepted_draft_tokens)
                if time.monotonic() >= self._offer_load_at:
                    self._offer_load_at = time.monotonic() + OFFER_EVERY_S
                    self._offer_expert_load()
                self._stream_interval = BUSY_STREAM_INTERVAL_S if stats.running >= self._busy_at else 0.0
            except Exception:
                log.exception("updating pool metrics failed")

    def _offer_expert_load(self) -> None:
        """The expert load this replica saw, for replicas that start later (r1serve.spec.expert_load): to the
        status board, where the operator keeps it in a ConfigMap; on one machine, straight into its file."""
        if self.plan.expert_parallel < 2 or not hasattr(self.engine, "expert_load"):
            return
        load = self.engine.expert_load()
        if not worth_keeping(load):
            return
        publish_expert_load(self.plan.pool, self._replica, encode_load(load))
        if not mounted():
            keep_locally(kept_load_path(self.plan.resource, self.plan.pool), load)

    def _publish_engine(self, kv_connector: str | None) -> None:
        try:
            description = dict(self.engine.describe())
            if kv_connector is not None:
                description["kvConnector"] = kv_connector
        except Exception:  # an expert-parallel group that does not answer fails its health check instead
            log.warning("could not read how the %s engine runs", self.role, exc_info=True)
            return
        log.info("%s replica engine: %s", self.role, format_engine(description))
        publish_engine(self.plan.pool, description)


def _replica_name() -> str:
    """This Serve replica's id, as `r1serve status` names it (the process id outside Serve)."""
    import os

    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not inside a Serve replica (unit tests)
        return f"pid-{os.getpid()}"


def _busy(stats) -> bool:
    return bool(stats.running or stats.waiting)


async def _checked(source: AsyncIterator[RequestOutput], min_interval) -> AsyncIterator[tuple]:
    """The engine's stream, coalesced, with engine errors turned into exceptions that cross processes."""
    try:
        async for out in coalesced(source, merge_outputs, min_interval):
            _raise_if_failed(out)
            yield to_wire(out)
    except (RequestError, SamplingParamsError) as exc:
        raise classify(exc) from None


def _raise_if_failed(out: RequestOutput) -> None:
    if out.error:
        raise EngineFailure(f"{out.request_id}: {out.error}")


