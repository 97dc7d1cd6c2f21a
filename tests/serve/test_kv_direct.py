"""Rank-to-rank hand-offs (runtime/parallel/transport.py) between Ray actors, as a prefill rank and a decode
rank use them, with the reference passed through a third actor as it passes through the replicas and the
Ingress: NIXL over UCX on CPU memory (one-sided, DirectLatents), gloo over a link per pair of ranks
(two-sided, GlooLatents), and cuda-ipc (IpcLatents), whose handles here name shared host memory: the same
torch.multiprocessing pickling that names a GPU tensor's CUDA IPC handle on a GPU."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from r1serve.runtime.engine.outputs import KVHandoff, KVTransferError, RemoteLatents
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.transport import KV_GROUP, direct_latents

TIMEOUT_S = 4.0
CONNECTORS = ("nixl", "gloo", "cuda-ipc")
# Those whose prefill rank keeps parked latents until kvTransfer.timeoutSeconds (not until the last reference).
TIMED = ("gloo", "cuda-ipc")


def _latents(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(3, tokens, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


class Rank:
    """What a rank actor does with its rank-to-rank store: park (prefill side) or pull (decode side), and,
    for gloo, answer a decode rank's link and offer calls (as transport._RankActor does)."""

    def __init__(self, connector: str, max_links: int = 32, device: str | None = None):
        self.direct = direct_latents(connector, TIMEOUT_S)
        self.direct.max_links = max_links
        self.direct.device = device  # where a cuda-ipc decode rank copies to (its actor sets its own)

    def park(self, tokens: int, seed: int, device: str = "cpu") -> list[RemoteLatents]:
        return [self.direct.park(_latents(tokens, seed).to(device))]  # in a list: only the reference travels

    def waiting_bytes(self) -> int:
        return self.direct.waiting_bytes()

    def pull(self, box: list[RemoteLatents]) -> torch.Tensor:
        handoff = KVHandoff("r", list(range(box[0].shape[1])), 7, SamplingParams(), box[0])
        return self.direct.pull(handoff).latents

    def kv_join(self, link: str, address: str) -> None:
        self.direct.join(link, address)

    def kv_offer(self, link: str, key: str, start: int = 0) -> str:
        return self.direct.offer(link, key, start)

    def kv_share(self, key: str, start: int = 0) -> bytes | None:
        return self.direct.share(key, start)

    def kv_release(self, key: str) -> None:
        self.direct.release(key)

    def pull_holding(self, box: list[RemoteLatents], cached: int) -> tuple[torch.Tensor, int]:
        """Pull as a decode rank whose cache holds the first `cached` tokens of the sequence."""
        self.direct.cached_tokens = lambda tokens: cached
        handoff = KVHandoff("r", list(range(box[0].shape[1])), 7, SamplingParams(), box[0])
        handoff = self.direct.pull(handoff)
        return handoff.latents, handoff.latents_start

    def links(self) -> int:
        return self.direct.links()


class Relay:
    """The replicas and the Ingress between the two ranks: they hold and pass on the reference only."""

    def __init__(self):
        self.held = None

    def hold(self, box):
        self.held = box
        return box

    def drop(self) -> None:
        self.held = None


@pytest.fixture(scope="module")
def actors(cluster):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the classes above, into the workers
    rank = ray.remote(num_cpus=0, enable_tensor_transport=True, concurrency_groups={KV_GROUP: 4})(Rank)
    return rank, ray.remote(num_cpus=0)(Relay)


def _eventually(check, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _pull(decode, box):
    import ray

    try:
        return ray.get(decode.pull.remote(box))
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from None


@pytest.mark.parametrize("connector", CONNECTORS)
def test_latents_move_rank_to_rank_and_are_freed_once_read(actors, connector):
    import ray

    Rank, Relay = actors
    prefill, decode, relay = Rank.remote(connector), Rank.remote(connector), Relay.remote()
    box = ray.get(relay.hold.remote(prefill.park.remote(64, seed=1)))
    remote = box[0]
    assert (remote.shape, remote.dtype, remote.nbytes, remote.transport) == ((3, 64, 16), "bfloat16", 3 * 64 * 16 * 2,
                                                                             connector)
    assert ray.get(prefill.waiting_bytes.remote()) == remote.nbytes  # parked until read
    assert torch.equal(ray.get(decode.pull.remote(box)), _latents(64, seed=1))
    if connector == "cuda-ipc":  # released once copied: well before kvTransfer.timeoutSeconds would free them
        _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, timeout_s=TIMEOUT_S / 2,
                    what="the copied latents to be released")
    # A second hand-off between the same two ranks goes over the link the first one made.
    assert torch.equal(_pull(decode, ray.get(prefill.park.remote(8, seed=4))), _latents(8, seed=4))
    if connector == "gloo":
        assert ray.get(decode.links.remote()) == 1 and ray.get(prefill.links.remote()) == 1
    del box, remote
    ray.get(relay.drop.remote())
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, what="the parked latents to be freed")


@pytest.mark.parametrize("connector", CONNECTORS)
def test_an_abandoned_hand_off_frees_its_latents_on_the_prefill_rank(actors, connector):
    """nixl frees them when the last reference goes; gloo and cuda-ipc when kvTransfer.timeoutSeconds passes."""
    import ray

    Rank, Relay = actors
    prefill, relay = Rank.remote(connector), Relay.remote()
    ray.get(relay.hold.remote(prefill.park.remote(32, seed=2)))
    assert ray.get(prefill.waiting_bytes.remote()) > 0
    ray.get(relay.drop.remote())  # the request was cancelled on its way: nobody will read them
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, timeout_s=TIMEOUT_S + 10,
                what="the abandoned latents to be freed")


@pytest.mark.parametrize("connector", CONNECTORS)
def test_a_hand_off_whose_prefill_rank_died_fails_with_a_transfer_error(actors, connector):
    import ray

    Rank, Relay = actors
    prefill, decode, relay = Rank.remote(connector), Rank.remote(connector), Relay.remote()
    if connector == "gloo":  # a link to the prefill rank exists already, and is dropped when it fails
        _pull(decode, ray.get(prefill.park.remote(4, seed=5)))
        assert ray.get(decode.links.remote()) == 1
    box = ray.get(relay.hold.remote(prefill.park.remote(16, seed=3)))
    ray.kill(prefill)
    started = time.monotonic()
    with pytest.raises(KVTransferError, match=rf"r: KV cache lost in transfer \({connector}\)"):
        _pull(decode, box)
    assert time.monotonic() - started < TIMEOUT_S + 5
    if connector == "gloo":
        assert ray.get(decode.links.remote()) == 0
        other = Rank.remote(connector)  # the decode rank goes on taking hand-offs from live ranks
        assert torch.equal(_pull(decode, ray.get(other.park.remote(8, seed=6))), _latents(8, seed=6))


@pytest.mark.parametrize("connector", TIMED)
def test_a_hand_off_read_after_its_timeout_fails_and_was_freed(actors, connector):
    import ray

    Rank, _ = actors
    prefill, decode = Rank.remote(connector), Rank.remote(connector)
    box = ray.get(prefill.park.remote(16, seed=7))
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, timeout_s=TIMEOUT_S + 10,
                what="the latents to expire")
    with pytest.raises(KVTransferError, match=r"no longer held by its prefill rank \(kvTransfer.timeoutSeconds"):
        _pull(decode, box)


def test_gloo_links_per_rank_are_bounded_and_made_again_when_closed(actors):
    """A decode rank that reads from more prefill ranks than its bound closes the least recently used link;
    a prefill rank that closed a link (its own bound) makes the decode rank link again, transparently."""
    import ray

    Rank, _ = actors
    prefills = [Rank.remote("gloo", max_links=1) for _ in range(3)]
    decode, second = Rank.remote("gloo", max_links=2), Rank.remote("gloo")
    for seed, prefill in enumerate(prefills):
        assert torch.equal(_pull(decode, ray.get(prefill.park.remote(8, seed=seed))), _latents(8, seed=seed))
    assert ray.get(decode.links.remote()) == 2
    # The second decode rank takes prefill 0's only link slot, so the first one's link there is closed.
    assert torch.equal(_pull(second, ray.get(prefills[0].park.remote(8, seed=10))), _latents(8, seed=10))
    assert ray.get(prefills[0].links.remote()) == 1
    assert torch.equal(_pull(decode, ray.get(prefills[0].park.remote(8, seed=11))), _latents(8, seed=11))
    assert ray.get(decode.links.remote()) == 2


@pytest.mark.parametrize("connector", TIMED)
def test_the_prefix_the_decode_rank_holds_is_not_moved_again(actors, connector):
    import ray

    Rank, _ = actors
    prefill, decode = Rank.remote(connector), Rank.remote(connector)
    latents, start = ray.get(decode.pull_holding.remote(ray.get(prefill.park.remote(48, seed=8)), 32))
    assert start == 32 and torch.equal(latents, _latents(48, seed=8)[:, 32:])
    assert ray.get(prefill.waiting_bytes.remote()) == 0


def test_cuda_ipc_hands_on_a_handle_to_the_prefill_ranks_memory_not_the_latents(actors):
    """What the decode rank gets is a few hundred bytes naming the memory the latents already occupy (a CUDA IPC
    handle on GPUs, a shared-memory file here); mapped, it reads the prefill rank's latents in place."""
    import pickle

    import ray

    Rank, _ = actors
    prefill = Rank.remote("cuda-ipc")
    remote = ray.get(prefill.park.remote(256, seed=12))[0]
    _, key, _ = remote.ref
    handle = ray.get(prefill.kv_share.remote(key, 64))
    assert len(handle) < 1024 < remote.nbytes
    assert torch.equal(pickle.loads(handle), _latents(256, seed=12)[:, 64:])
    assert ray.get(prefill.waiting_bytes.remote()) == remote.nbytes  # lent until released
    ray.get(prefill.kv_release.remote(key))
    assert ray.get(prefill.waiting_bytes.remote()) == 0
    assert ray.get(prefill.kv_share.remote(key)) is None  # taken once


def test_cuda_ipc_refuses_a_hand_off_from_another_machine(actors):
    from dataclasses import replace

    import ray

    Rank, _ = actors
    prefill, decode = Rank.remote("cuda-ipc"), Rank.remote("cuda-ipc")
    remote = ray.get(prefill.park.remote(8, seed=13))[0]
    actor, key, _ = remote.ref
    elsewhere = replace(remote, ref=(actor, key, "ab" * 28))
    with pytest.raises(KVTransferError, match=r"r: kvTransfer.connector cuda-ipc shares memory only on one machine, "
                                              r"and the prefill rank runs on node abababababab"):
        _pull(decode, [elsewhere])
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, timeout_s=TIMEOUT_S / 2,
                what="the refused hand-off's latents to be let go")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_ipc_moves_latents_from_gpu_to_gpu(actors):
    """Two ranks sharing the machine's GPUs (half of one GPU each where there is one): the decode rank's copy is
    on its GPU and equal to the prefill rank's latents."""
    import ray

    from r1serve.runtime.parallel.kv_ipc import SEE_EVERY_GPU

    Rank, _ = actors
    on_gpu = Rank.options(num_gpus=0.5, runtime_env={"env_vars": dict(SEE_EVERY_GPU)})
    last = f"cuda:{torch.cuda.device_count() - 1}"  # the decode rank's own GPU: another one where there are two
    prefill, decode = on_gpu.remote("cuda-ipc"), on_gpu.remote("cuda-ipc", device=last)
    box = ray.get(prefill.park.remote(4096, seed=14, device="cuda:0"))
    latents = _pull(decode, box)  # brought back to this process through Ray
    assert str(latents.device) == last
    assert torch.equal(latents.cpu(), _latents(4096, seed=14))
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, timeout_s=TIMEOUT_S / 2,
                what="the lent latents to be released")
