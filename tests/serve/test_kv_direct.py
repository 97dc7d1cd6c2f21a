"""Rank-to-rank hand-offs (runtime/parallel/transport.py, DirectLatents) between Ray actors, as a prefill
rank and a decode rank use them: NIXL over UCX on CPU memory, one-sided, with the reference passed through
a third actor as it passes through the replicas and the Ingress."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from r1serve.runtime.engine.outputs import KVHandoff, KVTransferError, RemoteLatents
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.parallel.transport import DirectLatents

TIMEOUT_S = 5.0


def _latents(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(3, tokens, 16, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


class Rank:
    """What a rank actor does with DirectLatents: park (prefill side) or pull (decode side)."""

    def __init__(self):
        self.direct = DirectLatents("nixl", TIMEOUT_S)

    def park(self, tokens: int, seed: int) -> list[RemoteLatents]:
        return [self.direct.park(_latents(tokens, seed))]  # in a list: only the reference travels

    def waiting_bytes(self) -> int:
        return self.direct.waiting_bytes()

    def pull(self, box: list[RemoteLatents]) -> torch.Tensor:
        handoff = KVHandoff("r", list(range(box[0].shape[1])), 7, SamplingParams(), box[0])
        return self.direct.pull(handoff).latents


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
    rank = ray.remote(num_cpus=0, enable_tensor_transport=True)(Rank)
    return rank, ray.remote(num_cpus=0)(Relay)


def _eventually(check, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_latents_move_rank_to_rank_and_are_freed_once_read(actors):
    import ray

    Rank, Relay = actors
    prefill, decode, relay = Rank.remote(), Rank.remote(), Relay.remote()
    box = ray.get(relay.hold.remote(prefill.park.remote(64, seed=1)))
    remote = box[0]
    assert (remote.shape, remote.dtype, remote.nbytes, remote.transport) == ((3, 64, 16), "bfloat16", 3 * 64 * 16 * 2,
                                                                             "nixl")
    assert ray.get(prefill.waiting_bytes.remote()) == remote.nbytes  # parked until read
    assert torch.equal(ray.get(decode.pull.remote(box)), _latents(64, seed=1))
    del box, remote
    ray.get(relay.drop.remote())
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, what="the parked latents to be freed")


def test_an_abandoned_hand_off_frees_its_latents_on_the_prefill_rank(actors):
    import ray

    Rank, Relay = actors
    prefill, relay = Rank.remote(), Relay.remote()
    ray.get(relay.hold.remote(prefill.park.remote(32, seed=2)))
    assert ray.get(prefill.waiting_bytes.remote()) > 0
    ray.get(relay.drop.remote())  # the request was cancelled on its way: nobody will read them
    _eventually(lambda: ray.get(prefill.waiting_bytes.remote()) == 0, what="the abandoned latents to be freed")


def test_a_hand_off_whose_prefill_rank_died_fails_with_a_transfer_error(actors):
    import ray

    Rank, Relay = actors
    prefill, decode, relay = Rank.remote(), Rank.remote(), Relay.remote()
    box = ray.get(relay.hold.remote(prefill.park.remote(16, seed=3)))
    ray.kill(prefill)
    started = time.monotonic()
    with pytest.raises(KVTransferError, match=r"r: KV cache lost in transfer \(nixl\)"):
        try:
            ray.get(decode.pull.remote(box))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
    assert time.monotonic() - started < TIMEOUT_S + 5
