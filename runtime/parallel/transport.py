"""How a group controller reaches its ranks: local processes, or Ray actors in placement-group bundles."""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import replace
from typing import Callable, Protocol, Sequence

import torch
import torch.multiprocessing as tmp

from r1serve.runtime.engine.outputs import KVHandoff, KVTransferError, RemoteLatents

from .kv_ipc import SEE_EVERY_GPU, LentLatents, copy_shared, drop_handle, visible_device
from .kv_pairs import PairLinks, ParkedLatents
from .layout import free_tcp_address
from .rank import RankSpec, rank_main


class RankTransport(Protocol):
    world_size: int
    specs: list[RankSpec]

    def send(self, rank: int, command: tuple) -> None: ...

    def receive(self, timeout_s: float) -> tuple | None:
        """The next message from any rank, or None after `timeout_s`."""
        ...

    def dead_ranks(self) -> dict[int, str]:
        """Every rank known to be gone, with why. Returns at once: the loop that delivers outputs asks."""
        ...

    def kill_rank(self, rank: int) -> None:
        """End one rank (alive but not answering), so the others can go on without it."""
        ...

    def address_for(self, rank: int, timeout_s: float) -> str:
        """A free address where `rank`, respawned, can lead a group; raises when its place (a placement-group
        bundle) cannot be scheduled within `timeout_s`."""
        ...

    def respawn(self, rank: int, spec: RankSpec) -> None:
        """Start `rank` again, in the place the lost one had, from `spec` (it joins a running group)."""
        ...

    def stop(self, timeout_s: float) -> None: ...

    def kill(self) -> None: ...


class _PipeOutbox:
    """A rank process's own pipe to the controller. A queue shared by every rank would stay locked for good if a
    rank were killed while writing to it; a rank killed mid-write here breaks only its own pipe."""

    def __init__(self, conn):
        self._conn = conn
        self._lock = threading.Lock()  # the rank's threads share it

    def put(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)


def _process_rank_main(spec: RankSpec, inbox, conn) -> None:
    rank_main(spec, inbox, _PipeOutbox(conn))


class ProcessTransport:
    """One spawned process per rank, each with its own command queue and its own pipe back; torch's pickler
    carries tensors through shared memory."""

    def __init__(self, specs: Sequence[RankSpec]):
        self._ctx = tmp.get_context("spawn")
        self.world_size = len(specs)
        self.specs = list(specs)  # as the ranks first started
        self._readers_lock = threading.Lock()  # the relay reads while a respawn adds a pipe
        self._readers: dict = {}  # pipe -> (rank, its process)
        self._closing: list = []  # pipes of lost ranks, closed by the relay thread (it may be waiting on them)
        self._received: deque[tuple] = deque()
        self._inboxes: list = [None] * self.world_size
        self.procs: list = [None] * self.world_size
        for spec in specs:
            self.respawn(spec.group.rank, spec)

    def respawn(self, rank: int, spec: RankSpec) -> None:
        inbox = self._ctx.Queue()
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_process_rank_main, args=(spec, inbox, writer), daemon=True,
                                 name=f"r1serve-ep-rank{rank}")
        proc.start()
        writer.close()  # the rank holds it: the pipe reads as closed once its rank is gone
        old_inbox, self._inboxes[rank], self.procs[rank] = self._inboxes[rank], inbox, proc
        with self._readers_lock:
            stale = [r for r, (owner, _) in self._readers.items() if owner == rank]
            for old in stale:  # the lost rank's pipe: nothing more comes from it; the relay closes it
                del self._readers[old]
                self._closing.append(old)
            self._readers[reader] = (rank, proc)
        if old_inbox is not None:
            old_inbox.cancel_join_thread()
            old_inbox.close()

    def address_for(self, rank: int, timeout_s: float) -> str:
        return free_tcp_address()

    def send(self, rank: int, command: tuple) -> None:
        self._inboxes[rank].put(command)

    def receive(self, timeout_s: float) -> tuple | None:
        from multiprocessing.connection import wait

        with self._readers_lock:
            readers = list(self._readers)
            closing, self._closing = self._closing, []
        for old in closing:
            old.close()
        if not self._received and readers:
            for reader in wait(readers, timeout_s):
                try:
                    while reader.poll():
                        self._received.append(reader.recv())
                except Exception:  # noqa: BLE001 - its rank is gone, maybe mid-write (dead_ranks says why)
                    with self._readers_lock:
                        owner = self._readers.pop(reader, None)
                    if owner is not None and owner[1].is_alive():  # unreadable but alive: made dead
                        owner[1].kill()
                        if self.procs[owner[0]] is owner[1]:
                            self._inboxes[owner[0]].cancel_join_thread()
        elif not self._received:
            time.sleep(timeout_s)
        return self._received.popleft() if self._received else None

    def dead_ranks(self) -> dict[int, str]:
        return {rank: f"rank {rank} exited (code {proc.exitcode})"
                for rank, proc in enumerate(self.procs) if not proc.is_alive()}

    def kill_rank(self, rank: int) -> None:
        self.procs[rank].kill()
        self._inboxes[rank].cancel_join_thread()  # what it never read must not hold this process's exit

    def stop(self, timeout_s: float) -> None:
        for inbox in self._inboxes:
            inbox.put(("stop",))
        for proc in self.procs:
            proc.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()


class DirectLatents:
    """Hand-offs rank to rank over one of Ray Direct Transport's one-sided transports (`nixl`).

    The prefill rank `park`s a hand-off's latents in its own RDT store, where they stay on its device, and
    hands on only the reference; the decode rank that takes the hand-off `pull`s them straight from there.
    They are freed when the last holder of the reference lets it go: once pulled, or when the request is
    abandoned on the way. `waiting_bytes` counts what is parked and not freed yet."""

    def __init__(self, transport: str, timeout_s: float):
        self.transport, self.timeout_s = transport, timeout_s
        self._parked: list[tuple[weakref.ref, int]] = []

    def park(self, latents: torch.Tensor) -> RemoteLatents:
        import ray

        nbytes = latents.numel() * latents.element_size()
        ref = ray.put(latents, _tensor_transport=self.transport)
        self._parked = [(alive, size) for alive, size in self._parked if alive() is not None]
        self._parked.append((weakref.ref(latents), nbytes))
        return RemoteLatents(ref, tuple(latents.shape), str(latents.dtype).removeprefix("torch."), nbytes,
                             self.transport)

    def pull(self, handoff: KVHandoff) -> KVHandoff:
        """The hand-off with its latents here; KVTransferError if they cannot be read in time."""
        import ray

        remote = handoff.latents
        if not isinstance(remote, RemoteLatents):
            return handoff
        try:
            latents = ray.get(remote.ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise KVTransferError.timed_out(handoff.request_id, self.timeout_s) from None
        except ray.exceptions.RayError as exc:
            raise KVTransferError.lost(handoff.request_id, f" ({remote.transport}): {type(exc).__name__}") from exc
        handoff.latents = latents
        return handoff

    def waiting_bytes(self) -> int:
        return sum(size for alive, size in self._parked if alive() is not None)


class GlooLatents:
    """Hand-offs rank to rank over two-member gloo groups (kv_pairs.py), for pools on CPUs: two-sided.

    The prefill rank `park`s a hand-off's latents under a key and hands on a reference to itself and the key;
    the decode rank that takes the hand-off links to that prefill rank (once, at their first hand-off) and
    asks it for the key, then receives the latents over the link. Parked latents are freed once sent, or when
    kvTransfer.timeoutSeconds passes (an abandoned request's are never asked for). Links are made lazily per
    pair of ranks, bounded per rank, and dropped by either side when an operation on them fails: a link to a
    rank that died fails at once and is not used again."""

    transport = "gloo"

    def __init__(self, timeout_s: float, max_links: int = 32):
        self.timeout_s, self.max_links = timeout_s, max_links
        self._parked = ParkedLatents(timeout_s)
        self._links: PairLinks | None = None
        self._link_to: dict[str, str] = {}  # decode side: prefill rank (actor id) -> link id
        # Decode side: how many leading tokens of a sequence the rank's own cache holds (set by its worker);
        # their latents are not sent again.
        self.cached_tokens: Callable[[list[int]], int] | None = None

    def __reduce__(self):  # sent to each rank actor as its settings; the state is the rank's own
        return GlooLatents, (self.timeout_s, self.max_links)

    def pairs(self) -> PairLinks:
        if self._links is None:  # in the rank's own process, on its node
            import ray

            self._links = PairLinks(ray.util.get_node_ip_address(), self.timeout_s, self.max_links)
        return self._links

    # Prefill side.
    def park(self, latents: torch.Tensor) -> RemoteLatents:
        import ray

        latents = latents.cpu()
        key = self._parked.park(latents)
        return RemoteLatents((ray.get_runtime_context().current_actor, key), tuple(latents.shape),
                             str(latents.dtype).removeprefix("torch."), latents.numel() * latents.element_size(),
                             self.transport)

    def waiting_bytes(self) -> int:
        return self._parked.waiting_bytes()

    def join(self, link: str, address: str) -> None:
        self.pairs().join(link, address, rank=0)

    def offer(self, link: str, key: str, start: int = 0) -> str:
        """Start sending the latents under `key` from token `start` on, on `link`: "sending", or why not
        ("no-link", "gone")."""
        group = self.pairs().group(link)  # held from here on, even if the link is closed meanwhile
        if group is None:
            return "no-link"
        latents = self._parked.take(key)
        if latents is None:
            return "gone"
        self.pairs().start_send(link, latents[:, start:], group)
        return "sending"

    # Decode side.
    def pull(self, handoff: KVHandoff) -> KVHandoff:
        """The hand-off with its latents here; KVTransferError if they cannot be received in time."""
        import ray

        remote = handoff.latents
        if not isinstance(remote, RemoteLatents):
            return handoff
        prefill, key = remote.ref
        peer = prefill._actor_id.hex()
        deadline = time.monotonic() + self.timeout_s
        start = self.cached_tokens(handoff.sequence_token_ids) if self.cached_tokens is not None else 0
        shape = (remote.shape[0], remote.shape[1] - start, *remote.shape[2:])
        try:
            for _ in range(2):  # a second time only if the prefill rank had closed our link
                link = self._link_to.get(peer)
                if link is None or not self.pairs().has(link):
                    link = self._link(prefill, deadline)
                    self._link_to[peer] = link
                answer = ray.get(prefill.kv_offer.options(concurrency_group=KV_GROUP).remote(link, key, start),
                                 timeout=_left(deadline))
                if answer == "sending":
                    handoff.latents = self.pairs().receive(link, shape, getattr(torch, remote.dtype),
                                                           _left(deadline))
                    handoff.latents_start = start
                    return handoff
                if answer == "gone":
                    raise KVTransferError.no_longer_held(handoff.request_id, self.timeout_s)
                self._forget(peer)
            raise KVTransferError.lost(handoff.request_id, " (gloo): the prefill rank keeps closing the link")
        except ray.exceptions.GetTimeoutError:
            self._forget(peer)
            raise KVTransferError.timed_out(handoff.request_id, self.timeout_s) from None
        except ray.exceptions.RayError as exc:
            self._forget(peer)
            raise KVTransferError.lost(handoff.request_id, f" (gloo): {type(exc).__name__}") from exc
        except RuntimeError as exc:  # the link failed or timed out; it is closed already
            if isinstance(exc, KVTransferError):
                raise
            self._forget(peer)
            timed_out = time.monotonic() >= deadline - 0.01 or "Timed out" in str(exc)
            if timed_out:
                raise KVTransferError.timed_out(handoff.request_id, self.timeout_s) from exc
            raise KVTransferError.lost(handoff.request_id, f" (gloo): {str(exc).splitlines()[0][:200]}") from exc

    def links(self) -> int:
        return len(self._links) if self._links is not None else 0

    def _link(self, prefill, deadline: float) -> str:
        import ray

        link, address = self.pairs().listen()
        joined = prefill.kv_join.options(concurrency_group=KV_GROUP).remote(link, address)
        try:
            self.pairs().join(link, address, rank=1, timeout_s=_left(deadline))
        except RuntimeError:
            ray.get(joined, timeout=_left(deadline))  # the prefill rank's own failure, if it has one, first
            raise
        ray.get(joined, timeout=_left(deadline))
        return link

    def _forget(self, peer: str) -> None:
        link = self._link_to.pop(peer, None)
        if link is not None:
            self.pairs().drop(link)


class IpcLatents:
    """Hand-offs rank to rank through memory the two ranks share on one machine (`cuda-ipc`, kv_ipc.py): a CUDA
    IPC handle for latents on a GPU, a shared-memory file for latents on the host.

    The prefill rank `park`s a hand-off's latents (LentLatents) and hands on a reference to itself, the key and
    its node; the decode rank that takes the hand-off asks it to share them (`kv_share`), maps and copies them to
    its own device, and releases them (`kv_release`). A prefix the decode rank's cache holds is not copied."""

    transport = "cuda-ipc"

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._lent = LentLatents(timeout_s)
        # Decode side: where copies go (the rank's device; set by the rank actor), and how many leading tokens
        # of a sequence the rank's own cache holds (set by its worker): their latents are not copied again.
        self.device: str | None = None
        self.cached_tokens: Callable[[list[int]], int] | None = None

    def __reduce__(self):  # sent to each rank actor as its settings; the state is the rank's own
        return IpcLatents, (self.timeout_s,)

    # Prefill side.
    def park(self, latents: torch.Tensor) -> RemoteLatents:
        import ray

        key = self._lent.park(latents)
        context = ray.get_runtime_context()
        return RemoteLatents((context.current_actor, key, context.get_node_id()), tuple(latents.shape),
                             str(latents.dtype).removeprefix("torch."), latents.numel() * latents.element_size(),
                             self.transport)

    def waiting_bytes(self) -> int:
        return self._lent.waiting_bytes()

    def share(self, key: str, start: int = 0) -> bytes | None:
        return self._lent.share(key, start)

    def release(self, key: str) -> None:
        self._lent.release(key)

    # Decode side.
    def pull(self, handoff: KVHandoff) -> KVHandoff:
        """The hand-off with its latents copied into this rank's memory; KVTransferError if they cannot be."""
        import ray

        remote = handoff.latents
        if not isinstance(remote, RemoteLatents):
            return handoff
        prefill, key, node = remote.ref
        here = ray.get_runtime_context().get_node_id()
        if node != here:
            prefill.kv_release.options(concurrency_group=KV_GROUP).remote(key)
            raise KVTransferError(f"{handoff.request_id}: kvTransfer.connector cuda-ipc shares memory only on one "
                                  f"machine, and the prefill rank runs on node {node[:12]}, this decode rank on "
                                  f"{here[:12]}")
        deadline = time.monotonic() + self.timeout_s
        start = self.cached_tokens(handoff.sequence_token_ids) if self.cached_tokens is not None else 0
        shared = prefill.kv_share.options(concurrency_group=KV_GROUP).remote(key, start)
        try:
            try:
                handle = ray.get(shared, timeout=_left(deadline))
            except ray.exceptions.GetTimeoutError:
                # The answer may still come, lending memory that only this process can give back.
                threading.Thread(target=_drop_late, args=(shared, prefill, key, self.timeout_s), daemon=True,
                                 name="r1serve-kv-ipc-drop").start()
                raise
            if handle is None:
                raise KVTransferError.no_longer_held(handoff.request_id, self.timeout_s)
            try:
                latents = copy_shared(handle, self.device)
            finally:
                prefill.kv_release.options(concurrency_group=KV_GROUP).remote(key)
        except ray.exceptions.GetTimeoutError:
            raise KVTransferError.timed_out(handoff.request_id, self.timeout_s) from None
        except ray.exceptions.RayError as exc:
            raise KVTransferError.lost(handoff.request_id, f" (cuda-ipc): {type(exc).__name__}") from exc
        except KVTransferError:
            raise
        except Exception as exc:  # noqa: BLE001 - the memory could not be mapped or copied: this hand-off is lost
            raise KVTransferError.lost(handoff.request_id,
                                       f" (cuda-ipc): {str(exc).splitlines()[0][:200]}") from exc
        handoff.latents, handoff.latents_start = latents, start
        return handoff


def _drop_late(shared, prefill, key: str, timeout_s: float) -> None:
    """A share that answered after its hand-off gave up: its handle is opened and dropped, and the latents let go."""
    import ray

    try:
        handle = ray.get(shared, timeout=timeout_s)
        if handle is not None:
            drop_handle(handle)
            prefill.kv_release.options(concurrency_group=KV_GROUP).remote(key)
    except Exception:  # noqa: BLE001 - the prefill rank is gone: so is what it lent
        pass


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


Direct = DirectLatents | GlooLatents | IpcLatents


def direct_latents(connector: str, timeout_s: float) -> Direct:
    """Where a rank keeps and fetches hand-off latents for a rank-to-rank connector."""
    if connector == GlooLatents.transport:
        return GlooLatents(timeout_s)
    if connector == IpcLatents.transport:
        return IpcLatents(timeout_s)
    return DirectLatents(connector, timeout_s)


class _RankActor:
    """A rank inside a Ray actor: the lockstep loop runs on a thread, commands arrive by method call, and the
    controller collects the rank's messages with `take` (or, with `outbox`, they go to a shared Ray queue).
    With `direct`, hand-offs move rank to rank: a decode rank reads a hand-off's latents here, off the
    lockstep loop, before its engine takes it."""

    def __init__(self, spec: RankSpec, outbox=None, direct: Direct | None = None):
        import os

        import ray

        # The address this rank offers when it leads a group formed again without a lost rank.
        spec = replace(spec, options={**spec.options, "host": ray.util.get_node_ip_address()})
        if isinstance(direct, IpcLatents):  # it sees every GPU of the node: its own named by number
            spec = replace(spec, device=visible_device(spec.device, ray.get_gpu_ids(),
                                                       os.environ.get("CUDA_VISIBLE_DEVICES")))
            direct.device = spec.device
        self._inbox: queue.Queue = queue.Queue()
        outbox = outbox if outbox is not None else queue.Queue()
        self._outbox, self._rank, self._direct = outbox, spec.first_rank, direct
        self._thread = threading.Thread(target=rank_main, args=(spec, self._inbox, outbox),
                                        kwargs={"parking": direct}, daemon=True)
        self._thread.start()

    def put(self, command: tuple) -> None:
        if command[0] == "handoff" and self._direct is not None:
            try:
                command = ("handoff", self._direct.pull(command[1]))
            except KVTransferError as exc:
                self._outbox.put(("lost", self._rank, command[1].request_id, str(exc)))
                return
        self._inbox.put(command)

    def alive(self) -> bool:
        return self._thread.is_alive()

    # Two-sided hand-offs (GlooLatents): a decode rank links to this prefill rank and asks for latents.
    def kv_join(self, link: str, address: str) -> None:
        self._direct.join(link, address)

    def kv_offer(self, link: str, key: str, start: int = 0) -> str:
        return self._direct.offer(link, key, start)

    # Hand-offs through shared memory (IpcLatents): a decode rank maps this prefill rank's latents, copies them.
    def kv_share(self, key: str, start: int = 0) -> bytes | None:
        return self._direct.share(key, start)

    def kv_release(self, key: str) -> None:
        self._direct.release(key)

    def take(self, wait_s: float) -> list[tuple]:
        """The rank's messages since the last call: at least one, unless `wait_s` passes first."""
        try:
            messages = [self._outbox.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self._outbox.get_nowait())
            except queue.Empty:
                return messages


# The controller's long poll of each rank: its own concurrency group (commands are not held up behind it),
# renewed this often when the rank has nothing to say.
TAKE_GROUP = "outputs"
TAKE_WAIT_S = 1.0
# Calls from decode ranks to a prefill rank for two-sided hand-offs: apart from commands and outputs, and a
# few at once (each blocks while its link forms).
KV_GROUP = "kv"


def rank_runtime_env(bundle: dict[str, float], direct: Direct | None) -> dict | None:
    """A rank that hands off through CUDA IPC sees every GPU of its node, so that a handle's device number
    names the same GPU in both ranks (it picks its own by number: visible_device)."""
    if isinstance(direct, IpcLatents) and bundle.get("GPU", 0):
        return {"env_vars": dict(SEE_EVERY_GPU)}
    return None


def _node_address() -> str:
    """Runs in rank 0's bundle: an address on that node which every rank can reach."""
    import socket

    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def rank0_address(placement_group, timeout_s: float, first_bundle: int = 1) -> str:
    """The rendezvous address of a group whose rank 0 runs in bundle `first_bundle` of `placement_group`."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = None
    if placement_group is not None:
        strategy = PlacementGroupSchedulingStrategy(placement_group, first_bundle)
    probe = ray.remote(_node_address).options(num_cpus=0, scheduling_strategy=strategy)
    return ray.get(probe.remote(), timeout=timeout_s)


class RayTransport:
    """Rank r is an actor in bundle `first_bundle + r` of the caller's placement group, so that Ray schedules
    the whole group together (a Serve replica reserves the bundles).

    Outputs come back straight from each rank: the controller keeps one `take` call open per rank (a long
    poll, in its own concurrency group so that commands keep flowing) and renews it when it returns. The
    `queue` relay, one shared Ray queue actor that every rank puts into and the controller reads, is the
    simple path kept as the reference."""

    RELAYS = ("direct", "queue")

    def __init__(self, specs: Sequence[RankSpec], bundles: Sequence[dict[str, float]], *, placement_group=None,
                 first_bundle: int = 1, direct: Direct | None = None,
                 relay: str = "direct", unanswered_s: float = 60.0):
        import ray
        from ray.util.queue import Queue

        if relay not in self.RELAYS:
            raise ValueError(f"relay: must be one of {', '.join(self.RELAYS)} (got {relay!r})")
        self.world_size, self.relay = len(specs), relay
        self.specs = list(specs)  # as the ranks first started
        self._outbox = Queue(actor_options={"num_cpus": 0}) if relay == "queue" else None
        self._pending: dict = {}  # open `take` call -> rank
        self._killed = False
        self._received: deque[tuple] = deque()
        self._actor_class = ray.remote(enable_tensor_transport=isinstance(direct, DirectLatents),
                                       concurrency_groups={TAKE_GROUP: 1, KV_GROUP: 4})(_RankActor)
        self._bundles, self._placement_group, self._first_bundle = list(bundles), placement_group, first_bundle
        self._direct = direct
        self._gone: dict[int, str] = {}  # rank -> why it is known to be gone
        self._respawned: deque[int] = deque()  # ranks whose outputs the relay starts collecting
        # Respawned ranks whose actor has not answered yet: starting one (a new worker, imports, a node that
        # comes back) may take longer than a liveness probe waits, which is no sign of a stuck rank.
        self._starting: set[int] = set()
        # Liveness probes in flight (ref -> rank, when sent). A probe is never waited on: the relay that asks
        # must keep delivering outputs. A rank whose probe goes unanswered for `unanswered_s` is taken for dead.
        self._probes: dict = {}
        self._probes_lock = threading.Lock()  # the relay and the grow-back thread both ask
        self.unanswered_s = unanswered_s
        self.actors: list = [None] * self.world_size
        for spec in specs:
            self.actors[spec.group.rank] = self._start(spec.group.rank, spec)

    def _start(self, rank: int, spec: RankSpec):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self._bundles[rank]
        resources = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        strategy = None
        if self._placement_group is not None:
            strategy = PlacementGroupSchedulingStrategy(self._placement_group, self._first_bundle + rank)
        return self._actor_class.options(
            num_cpus=bundle.get("CPU", 1), num_gpus=bundle.get("GPU", 0), resources=resources,
            scheduling_strategy=strategy, name=None, max_restarts=0,
            runtime_env=rank_runtime_env(bundle, self._direct),
        ).remote(spec, self._outbox, self._direct)

    def address_for(self, rank: int, timeout_s: float) -> str:
        # A probe in the lost rank's bundle: it answers once Ray can schedule that bundle again (a node that
        # died is replaced first), with an address on the node the respawned rank will run on.
        return rank0_address(self._placement_group, timeout_s, self._first_bundle + rank)

    def respawn(self, rank: int, spec: RankSpec) -> None:
        with self._probes_lock:  # the lost actor's probes say nothing of the new one
            self._probes = {ref: probe for ref, probe in self._probes.items() if probe[0] != rank}
        self.actors[rank] = self._start(rank, spec)
        self._gone.pop(rank, None)
        self._starting.add(rank)
        self._respawned.append(rank)

    def send(self, rank: int, command: tuple) -> None:
        self.actors[rank].put.remote(command)

    def receive(self, timeout_s: float) -> tuple | None:
        if self._outbox is not None:
            from ray.util.queue import Empty

            try:
                return self._outbox.get(timeout=timeout_s)
            except Empty:
                return None
        deadline = time.monotonic() + timeout_s
        while not self._received:
            self._take(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        return self._received.popleft() if self._received else None

    def _take(self, timeout_s: float) -> None:
        import ray

        if not self._pending and not self._killed:
            self._respawned.clear()
            for rank in range(self.world_size):
                if rank not in self._gone:
                    self._ask(rank)
        while self._respawned and not self._killed:
            self._ask(self._respawned.popleft())
        if not self._pending:  # every rank died, or the group is being torn down
            time.sleep(timeout_s)
            return
        ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=timeout_s)
        for ref in ready:
            rank = self._pending.pop(ref)
            try:
                self._received.extend(ray.get(ref))
                self._starting.discard(rank)
            except Exception as exc:  # noqa: BLE001 - a dead rank answers with an error
                if not self._killed and rank not in self._gone:  # not the group's own shutdown
                    self._gone[rank] = f"rank {rank} is gone ({type(exc).__name__})"
                    self._received.append(("dead", rank, self._gone[rank]))
                continue
            if not self._killed:
                self._ask(rank)

    def _ask(self, rank: int) -> None:
        ref = self.actors[rank].take.options(concurrency_group=TAKE_GROUP).remote(TAKE_WAIT_S)
        self._pending[ref] = rank

    def dead_ranks(self) -> dict[int, str]:
        """Ranks known to be gone. An actor that died answers its probe with an error; one that is alive but
        whose probe waits `unanswered_s` is stuck and taken for dead too. The probe runs in the commands'
        group on purpose: a rank whose commands are stuck (a hand-off read that does not return) is found,
        and its group goes on without it or fails, instead of hanging. A slow answer is no sign of a stuck
        rank on a loaded machine, so nothing shorter than the group's own timeout judges it."""
        import ray

        with self._probes_lock:
            now = time.monotonic()
            if self._probes:
                answered, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=0)
                for ref in answered:
                    rank, _ = self._probes.pop(ref)
                    try:
                        if not ray.get(ref):
                            self._gone.setdefault(rank, f"rank {rank} stopped")
                    except Exception as exc:  # noqa: BLE001 - a dead actor answers with an error
                        self._gone.setdefault(rank, f"rank {rank} is gone ({type(exc).__name__})")
            for ref, (rank, sent) in list(self._probes.items()):
                if rank in self._gone:
                    del self._probes[ref]
                elif rank in self._starting:  # its start is not counted against it
                    self._probes[ref] = (rank, now)
                elif now - sent > self.unanswered_s:
                    del self._probes[ref]
                    self._gone[rank] = f"rank {rank} did not answer for {self.unanswered_s:g}s"
            probed = {rank for rank, _ in self._probes.values()}
            for rank, actor in enumerate(self.actors):
                if rank not in self._gone and rank not in probed:
                    self._probes[actor.alive.remote()] = (rank, now)
            return dict(self._gone)

    def kill_rank(self, rank: int) -> None:
        import ray

        self._gone.setdefault(rank, f"rank {rank} was stopped: it did not answer")
        ray.kill(self.actors[rank], no_restart=True)

    def stop(self, timeout_s: float) -> None:
        for rank in range(self.world_size):
            self.send(rank, ("stop",))
        self.kill()

    def kill(self) -> None:
        import ray

        self._killed = True
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
