"""Two-sided hand-offs between a prefill rank and a decode rank: a two-member gloo process group per pair of
ranks, made at their first hand-off and dropped on any failure.

A group of the whole pool cannot follow replicas that come and go, and one process can hold any number of
independent groups (each is its own store prefix and its own connections), so every decode rank that reads
from a prefill rank links to it on its own. The decode rank hosts the pair's rendezvous store and starts the
link; the prefill rank joins it. The number of links a rank keeps is bounded: beyond `max_links` the least
recently used is closed (its peer finds it closed at the next use, and links again).

The decode rank asks for a hand-off's latents by a call to the prefill rank, which answers at once whether it
can send them (it may no longer hold the link, or the latents) and, if so, starts sending; the decode rank
then receives them. A failed or timed-out operation closes the link on the side that saw it; the other
side's next operation on it then fails, and that side drops it too.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist


class ParkedLatents:
    """A prefill rank's hand-off latents, kept under a key until a decode rank takes them or `timeout_s`
    passes (the decode side gives up at the same timeout, so nobody reads them after that)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._parked: dict[str, tuple[torch.Tensor, float]] = {}

    def park(self, latents: torch.Tensor) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._parked[key] = (latents, time.monotonic() + self.timeout_s)
        return key

    def take(self, key: str) -> torch.Tensor | None:
        with self._lock:
            self._expire()
            latents, _ = self._parked.pop(key, (None, 0.0))
        return latents

    def waiting_bytes(self) -> int:
        with self._lock:
            self._expire()
            return sum(t.numel() * t.element_size() for t, _ in self._parked.values())

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, deadline) in self._parked.items() if deadline <= now]:
            del self._parked[key]


class PairLinks:
    """This rank's links to other ranks, by link id: at most `max_links`, least recently used closed first."""

    def __init__(self, host: str, timeout_s: float, max_links: int = 32):
        self.host, self.timeout_s, self.max_links = host, timeout_s, max_links
        self._lock = threading.Lock()
        self._links: OrderedDict[str, dist.ProcessGroup] = OrderedDict()
        self._stores: dict[str, dist.TCPStore] = {}

    def __len__(self) -> int:
        return len(self._links)

    def has(self, link: str) -> bool:
        with self._lock:
            if link in self._links:
                self._links.move_to_end(link)
                return True
            return False

    def listen(self) -> tuple[str, str]:
        """Decode side: a new link id and the address of its rendezvous store, hosted here."""
        store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=self.timeout_s))
        link = uuid.uuid4().hex
        with self._lock:
            self._stores[link] = store
        return link, f"{self.host}:{store.port}"

    def join(self, link: str, address: str, rank: int, timeout_s: float | None = None) -> None:
        """Form the two-member group `link` (rank 1 is the side that listened); blocks until both joined, at
        most `timeout_s` (default: the links' timeout)."""
        wait = timedelta(seconds=max(0.001, timeout_s if timeout_s is not None else self.timeout_s))
        store = self._stores.get(link)
        if store is None:
            host, port = address.rsplit(":", 1)
            store = dist.TCPStore(host, int(port), is_master=False, timeout=wait)
        else:
            store.set_timeout(wait)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = wait
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore(link, store), rank, 2, options)
        finally:
            with self._lock:
                self._stores.pop(link, None)  # the group keeps what it needs of the store
        with self._lock:
            self._links[link] = group
            while len(self._links) > self.max_links:
                self._links.popitem(last=False)

    def drop(self, link: str) -> None:
        with self._lock:
            self._links.pop(link, None)
            self._stores.pop(link, None)

    def group(self, link: str) -> dist.ProcessGroup | None:
        """The link's group, or None if it is closed (a caller that holds it may use it after a close)."""
        with self._lock:
            return self._links.get(link)

    def start_send(self, link: str, latents: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Prefill side: begin sending on `link` and return; a thread waits for the send to finish (closing the
        link if it fails) and holds the latents until then."""
        group = group if group is not None else self._group(link)
        latents = latents.contiguous()
        work = group.send([latents], 1, 0)

        def finish() -> None:
            try:
                work.wait(timedelta(seconds=self.timeout_s))
            except RuntimeError:
                self.drop(link)

        threading.Thread(target=finish, daemon=True, name=f"r1serve-kv-send-{link[:8]}").start()

    def receive(self, link: str, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float) -> torch.Tensor:
        """Decode side: the latents the other side is sending on `link`."""
        group = self._group(link)
        latents = torch.empty(shape, dtype=dtype)
        try:
            group.recv([latents], 0, 0).wait(timedelta(seconds=max(0.001, timeout_s)))
        except RuntimeError:
            self.drop(link)
            raise
        return latents

    def _group(self, link: str) -> dist.ProcessGroup:
        with self._lock:
            group = self._links.get(link)
        if group is None:
            raise RuntimeError(f"link {link} is closed")
        return group

