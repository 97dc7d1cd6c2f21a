"""Hand-offs rank to rank through memory that a prefill rank's and a decode rank's processes share on one
machine (`kvTransfer.connector: cuda-ipc`, `r1serve serve` only): the memory side, without Ray
(transport.IpcLatents is the ranks' side).

The prefill rank keeps a hand-off's latents where it computed them and hands on a reference (its actor, a key,
its node). The decode rank that takes the hand-off asks the prefill rank to share them; the answer is a few
hundred bytes: torch.multiprocessing's pickling of the tensor, which for a GPU tensor is a CUDA IPC handle
(with an event that orders the read after the prefill rank's writes) and for a host tensor the name of a
shared-memory file. The decode rank maps that memory, copies the latents into its own (a device-to-device copy
per layer), and tells the prefill rank to let them go. No byte crosses a socket; on GPUs none crosses host memory.

Latents are freed once copied, or when kvTransfer.timeoutSeconds passes (an abandoned request's are never
asked for, and a decode rank that died while copying never releases them). Both ranks must see every GPU of
the machine so that a handle's device number means the same GPU to both (RayTransport starts them so), and
both must run on one node: a reference from another node fails the hand-off, naming the connector.
"""

from __future__ import annotations

import pickle
import threading
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as tmp

from .kv_pairs import ParkedLatents

# Ray leaves CUDA_VISIBLE_DEVICES as the node has it for a worker started with this set, so every rank of the
# machine numbers its GPUs alike; a rank then picks the one Ray gave it (visible_device).
SEE_EVERY_GPU = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def visible_device(device: str, gpu_ids: list, cuda_visible: str | None) -> str:
    """The device a rank that sees every GPU of its node runs on: the GPU Ray gave it (`gpu_ids`, as Ray
    numbers the node's GPUs), by its index among the GPUs this process sees (`cuda_visible`, the node's
    CUDA_VISIBLE_DEVICES, or None for all of them)."""
    if not device.startswith("cuda") or ":" in device or not gpu_ids:
        return device
    # Ray lists a rank's GPUs in no fixed order: the lowest, so that a rank with several always picks the same.
    gpu = min((str(g) for g in gpu_ids), key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g))
    visible = [d.strip() for d in cuda_visible.split(",")] if cuda_visible else None
    if visible is None:
        return f"cuda:{int(gpu)}"
    if gpu not in visible:
        raise RuntimeError(f"kvTransfer.connector cuda-ipc: GPU {gpu} given to this rank is not among the node's "
                           f"CUDA_VISIBLE_DEVICES ({cuda_visible})")
    return f"cuda:{visible.index(gpu)}"


def share_handle(latents: torch.Tensor) -> bytes:
    """A few hundred bytes by which another process of this machine maps `latents` (a view keeps its offset and
    strides): a CUDA IPC handle for a GPU tensor, a shared-memory file's name for a host tensor (moved into
    one first, unless it is there already)."""
    if latents.device.type == "cpu":
        into_shared_memory(latents)
    return bytes(ForkingPickler.dumps(latents))


def into_shared_memory(latents: torch.Tensor) -> None:
    # Ray's workers are unrelated processes: a file descriptor cannot pass between them, a file name can.
    tmp.set_sharing_strategy("file_system")
    latents.share_memory_()


def copy_shared(handle: bytes, device: str | torch.device | None = None) -> torch.Tensor:
    """Map what `handle` names and copy it to `device` (default: where it is), finished when this returns.

    Layer by layer: a layer's tokens are contiguous where a slice of several layers is not, so each is one plain
    copy, and nothing is allocated on the other rank's device for a contiguous copy first."""
    shared = pickle.loads(handle)
    latents = torch.empty(shared.shape, dtype=shared.dtype, device=device if device is not None else shared.device)
    for layer in range(shared.shape[0]):
        latents[layer].copy_(shared[layer])
    if latents.device.type == "cuda":
        torch.cuda.synchronize(latents.device)  # copied before its owner may reuse the memory
    del shared
    return latents


def drop_handle(handle: bytes) -> None:
    """Open a handle and let it go at once: a CUDA IPC handle's memory stays lent until the process it was sent to
    has opened and freed it (torch counts each one sent), so one that will not be copied is still opened."""
    opened = pickle.loads(handle)
    del opened


class LentLatents:
    """A prefill rank's hand-off latents: parked under a key until a decode rank asks to share them, then lent
    until it releases them; either way let go when `timeout_s` passes."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._parked = ParkedLatents(timeout_s)
        self._lock = threading.Lock()
        self._lent: dict[str, tuple[torch.Tensor, float]] = {}  # key -> (latents, when they are let go anyway)

    def park(self, latents: torch.Tensor) -> str:
        if latents.device.type == "cpu":
            into_shared_memory(latents)  # now: sharing it later is then only naming it
        else:
            # Written on the rank's stream (this thread's); the handle's event, recorded later on another
            # thread's, would not order a decode rank's read after those writes.
            torch.cuda.current_stream(latents.device).synchronize()
        return self._parked.park(latents)

    def waiting_bytes(self) -> int:
        with self._lock:
            self._expire()
            lent = sum(t.numel() * t.element_size() for t, _ in self._lent.values())
        return self._parked.waiting_bytes() + lent

    def share(self, key: str, start: int = 0) -> bytes | None:
        """The handle of the latents under `key` from token `start` on, lent until `release(key)` or the
        timeout; None if they are no longer held."""
        latents = self._parked.take(key)
        if latents is None:
            return None
        with self._lock:
            self._expire()
            self._lent[key] = (latents, time.monotonic() + self.timeout_s)
        return share_handle(latents[:, start:])

    def release(self, key: str) -> None:
        """Let the latents under `key` go, lent or still parked (a decode rank that refused the hand-off)."""
        with self._lock:
            latents, _ = self._lent.pop(key, (None, 0.0))
        latents = latents if latents is not None else self._parked.take(key)
        if latents is not None and latents.device.type == "cuda":
            del latents
            torch.cuda.ipc_collect()  # memory the decode rank has let go of goes back to the allocator

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [k for k, (_, deadline) in self._lent.items() if deadline <= now]
        for key in expired:
            del self._lent[key]
        if expired and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()
