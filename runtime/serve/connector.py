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

from r1serve.runtime.engine.outputs import KVHandoff, KVTransferError, RemoteLatents
from r1serve.spec import R1Deployment

log = logging.getLogger(__name__)

OBJECT_STORE = "object-store"
NIXL = "nixl"
GLOO = "gloo"
CUDA_IPC = "cuda-ipc"
# Connectors whose hand-offs move rank to rank: the prefill rank keeps the latents until the decode rank
# that takes the hand-off reads them (runtime/parallel/transport.py, kv_ipc.py).
RANK_TO_RANK = (NIXL, GLOO, CUDA_IPC)
# What a FaultyConnector does to every hand-off: fails it as a lost one or as one that arrives too late, or
# holds its ticket for HELD_S before taking it as usual (a window in which either side can be made to fail
# with tickets issued and latents not read yet).
KV_FAULTS = ("lost", "timeout", "held")
HELD_S = 8.0


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
            raise KVTransferError.timed_out(ticket.request_id, self.timeout_s) from None
        except ray.exceptions.RayError as exc:
            raise KVTransferError.lost(ticket.request_id, f": {exc}") from exc


class DirectConnector:
    """Rank to rank (nixl one-sided, gloo two-sided, cuda-ipc through memory shared on one machine): the hand-off's
    latents stay on the prefill rank (RemoteLatents) and the decode rank that takes it reads them from there
    (runtime/parallel/transport.py); only the small hand-off with its reference travels through the replicas and
    the Ingress. The decode rank's read is bounded by kvTransfer.timeoutSeconds."""

    def __init__(self, timeout_s: float, name: str):
        self.timeout_s, self.name = timeout_s, name

    def send(self, handoff: KVHandoff) -> HandoffTicket:
        if not isinstance(handoff.latents, RemoteLatents):
            raise KVTransferError(f"{handoff.request_id}: the prefill engine copied its KV cache to the host; "
                                  f"kvTransfer.connector {self.name} needs it left on the prefill rank")
        return HandoffTicket(handoff.request_id, len(handoff.prompt_token_ids), handoff.nbytes, handoff)

    async def receive(self, ticket: HandoffTicket) -> KVHandoff:
        return ticket.ref


def nixl_importable() -> bool:
    try:
        import nixl  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as unusable as a missing one
        return False
    return True


def connector_name(deployment: R1Deployment) -> str:
    """The connector a deployment's replicas use."""
    gpus = any(pool.gpus_per_rank for pool in deployment.spec.active_pools().values())
    return resolve_connector(deployment.spec.kv_transfer.connector, gpus=gpus)


def resolve_connector(wanted: str, *, gpus: bool) -> str:
    """What kvTransfer.connector names, `auto` resolved here: on CPUs gloo; on GPUs nixl where it can be
    imported, else the object store (shown in `r1serve status`, as every resolved connector is). Never a
    silent substitute: a named connector that cannot run here is an error naming the field."""
    if wanted == "auto":
        if not gpus:
            return GLOO
        return NIXL if nixl_importable() else OBJECT_STORE
    if wanted == NIXL and not nixl_importable():
        raise RuntimeError("spec.kvTransfer.connector: nixl needs the nixl package on every node "
                           "(pip install 'r1serve[nixl]'); it cannot be imported here")
    if wanted == GLOO and gpus:
        raise RuntimeError("spec.kvTransfer.connector: gloo moves host memory between CPU pools; pools with "
                           "GPUs use nixl (or object-store)")
    if wanted == CUDA_IPC and not gpus:
        raise RuntimeError("spec.kvTransfer.connector: cuda-ipc shares GPU memory; pools on CPUs use gloo")
    if wanted not in CONNECTORS:
        raise RuntimeError(f"spec.kvTransfer.connector: {wanted} cannot be used here")
    return wanted


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def make_connector(deployment: R1Deployment, fault: str | None = None) -> KVConnector:
    """The deployment's connector; with `fault` (one of KV_FAULTS) wrapped in a FaultyConnector."""
    timeout = deployment.spec.kv_transfer.timeout_seconds
    name = connector_name(deployment)
    if name == CUDA_IPC and (nodes := alive_nodes()) > 1:  # `r1serve serve --address` joined a larger cluster
        raise RuntimeError(f"spec.kvTransfer.connector: cuda-ipc shares GPU memory on one machine, and this Ray "
                           f"cluster has {nodes} nodes; use nixl or object-store")
    connector = DirectConnector(timeout, name) if name in RANK_TO_RANK else ObjectStoreConnector(timeout)
    return FaultyConnector(connector, fault, timeout) if fault is not None else connector


class FaultyConnector:
    """Test double around a real connector: every `receive` fails, as a lost or a late hand-off would, or is
    held for HELD_S first (KV_FAULTS).

    For testing the serving layers: the application's `engine` argument selects it (EngineSource.kv_fault)."""

    def __init__(self, inner: KVConnector, mode: str, timeout_s: float):
        if mode not in KV_FAULTS:
            raise ValueError(f"kv_fault: must be one of {', '.join(KV_FAULTS)} (got {mode!r})")
        self.inner, self.mode, self.timeout_s, self.name = inner, mode, timeout_s, inner.name

    def send(self, handoff: KVHandoff) -> HandoffTicket:
        return self.inner.send(handoff)

    async def receive(self, ticket: HandoffTicket) -> KVHandoff:
        if self.mode == "held":
            await asyncio.sleep(HELD_S)
            return await self.inner.receive(ticket)
        if self.mode == "timeout":
            await asyncio.sleep(self.timeout_s)
            raise KVTransferError.timed_out(ticket.request_id, self.timeout_s, "; injected")
        raise KVTransferError.lost(ticket.request_id, " (injected)")


CONNECTORS = (OBJECT_STORE, *RANK_TO_RANK)
