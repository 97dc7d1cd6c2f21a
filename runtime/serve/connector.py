"""KV connectors: how a prefilled sequence's latent KV cache travels from a prefill to a decode replica.

The prefill replica `send`s a KVHandoff and gets back a small, picklable ticket; the ticket travels
through the Ingress (only a reference, never the latents); the decode replica `receive`s the handoff
with it. Connectors own the transport; replicas and the Ingress see only this interface.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from r1serve.runtime.engine.outputs import KVHandoff
from r1serve.spec import R1Deployment

log = logging.getLogger(__name__)

OBJECT_STORE = "object-store"
NCCL = "nccl"


class KVTransferError(RuntimeError):
    """The hand-off could not be received (timed out, or its owner died)."""


@dataclass(frozen=True)
class HandoffTicket:
    """What the Ingress passes from prefill to decode: ids and sizes, plus the transport's reference."""

    request_id: str
    num_prompt_tokens: int
    nbytes: int
    ref: Any  # connector-specific: an ObjectRef for the object store


class KVConnector(Protocol):
    name: str

    def send(self, handoff: KVHandoff) -> HandoffTicket:
        """Prefill side: make the hand-off available to a decode replica."""
        ...

    async def receive(self, ticket: HandoffTicket) -> KVHandoff:
        """Decode side: the hand-off, or KVTransferError after the configured timeout."""
        ...


class ObjectStoreConnector:
    """Through Ray's object store: works on any cluster, CPU or GPU (latents are copied to host memory).

    `send` puts the hand-off into the prefill node's object store; the decode replica pulls it directly
    from there. The object lives as long as a ticket references it, so an abandoned request frees it.
    """

    name = OBJECT_STORE

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def send(self, handoff: KVHandoff) -> HandoffTicket:
        import ray

        if handoff.latents.device.type != "cpu":
            handoff.latents = handoff.latents.cpu()
        ref = ray.put(handoff)
        return HandoffTicket(handoff.request_id, len(handoff.prompt_token_ids), handoff.nbytes, ref)

    async def receive(self, ticket: HandoffTicket) -> KVHandoff:
        import ray

        try:
            return await asyncio.wait_for(asyncio.wrap_future(ticket.ref.future()), self.timeout_s)
        except TimeoutError:
            raise KVTransferError(f"{ticket.request_id}: KV cache not received within {self.timeout_s:g}s "
                                  "(kvTransfer.timeoutSeconds)") from None
        except ray.exceptions.RayError as exc:
            raise KVTransferError(f"{ticket.request_id}: KV cache lost in transfer: {exc}") from exc


class NcclConnector:
    """Design slot: GPU-to-GPU transfer of latents between the two pools' ranks.

    Planned shape (as SGLang's and Ray Serve LLM's NIXL/NCCL connectors): each decode rank registers a
    receive buffer; `send` returns a ticket holding the prefill rank's address and the cache block ids
    instead of the tensor; `receive` asks the prefill rank to write its blocks straight into the decode
    rank's paged cache over NCCL (send/recv on a communicator created per prefill-decode rank pair),
    then releases the prefill blocks. The engine's KVHandoff already carries everything but the
    transport, so only this class changes when it lands.
    """

    name = NCCL

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def send(self, handoff: KVHandoff) -> HandoffTicket:
        raise NotImplementedError("the NCCL KV connector is not implemented yet; use kvTransfer.connector: "
                                  "object-store")

    async def receive(self, ticket: HandoffTicket) -> KVHandoff:
        raise NotImplementedError("the NCCL KV connector is not implemented yet")


def connector_name(deployment: R1Deployment) -> str:
    """The connector a deployment uses: `auto` is the object store until the NCCL connector exists."""
    wanted = deployment.spec.kv_transfer.connector
    if wanted == NCCL:
        log.warning("kvTransfer.connector nccl is not implemented yet; using the object store")
    return OBJECT_STORE


def make_connector(deployment: R1Deployment, fault: str | None = None) -> KVConnector:
    """The deployment's connector; with `fault` (lost or timeout) wrapped in a FaultyConnector."""
    timeout = deployment.spec.kv_transfer.timeout_seconds
    connectors = {OBJECT_STORE: ObjectStoreConnector, NCCL: NcclConnector}
    connector = connectors[connector_name(deployment)](timeout)
    return FaultyConnector(connector, fault, timeout) if fault is not None else connector


class FaultyConnector:
    """Test double around a real connector: every `receive` fails, as a lost or a late hand-off would.

    For testing the serving layers: the application's `engine` argument selects it (EngineSource.kv_fault)."""

    def __init__(self, inner: KVConnector, mode: str, timeout_s: float):
        if mode not in ("lost", "timeout"):
            raise ValueError(f"kv_fault: must be 'lost' or 'timeout' (got {mode!r})")
        self.inner, self.mode, self.timeout_s, self.name = inner, mode, timeout_s, inner.name

    def send(self, handoff: KVHandoff) -> HandoffTicket:
        return self.inner.send(handoff)

    async def receive(self, ticket: HandoffTicket) -> KVHandoff:
        if self.mode == "timeout":
            await asyncio.sleep(self.timeout_s)
            raise KVTransferError(f"{ticket.request_id}: KV cache not received within {self.timeout_s:g}s "
                                  "(kvTransfer.timeoutSeconds; injected)")
        raise KVTransferError(f"{ticket.request_id}: KV cache lost in transfer (injected)")
