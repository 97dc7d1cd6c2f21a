"""A rank's view of expert parallelism: the process group, and per-layer placements and dispatchers."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from r1serve.runtime.model.config import ModelConfig

from .dispatch import AllToAllDispatcher
from .placement import ExpertPlacement, uniform_placement


@dataclass(frozen=True)
class GroupConfig:
    """How one rank joins its expert-parallel group."""

    world_size: int
    rank: int
    init_method: str  # e.g. tcp://127.0.0.1:PORT, agreed by every rank
    backend: str = "auto"  # auto: NCCL when the model runs on CUDA, else gloo
    timeout_s: float = 60.0  # a collective waiting longer than this fails instead of hanging
    # How long ranks wait for each other to meet (they start, and load the model, at their own pace): apart from
    # the collective timeout, which bounds how long a lost rank goes unnoticed.
    meet_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}) (got {self.rank})")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be positive (got {self.timeout_s})")
        if self.meet_timeout_s <= 0:
            raise ValueError(f"meet_timeout_s: must be positive (got {self.meet_timeout_s})")


FAILURE_POLICIES = ("degrade", "restart")


@dataclass(frozen=True)
class Failover:
    """What a group does when one of its ranks dies or stops answering (experts.onRankFailure and
    experts.failoverHeadroomSlots). degrade: the survivors form a group without it and keep serving, taking on
    the lost experts in at most `headroom_slots` added slots each. restart: the group fails, every request on
    it ends with a retryable error, and the replica is replaced."""

    policy: str = "degrade"
    headroom_slots: int = 0

    def __post_init__(self) -> None:
        if self.policy not in FAILURE_POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(FAILURE_POLICIES)} (got {self.policy!r})")
        if self.headroom_slots < 0:
            raise ValueError(f"headroom_slots: must be >= 0 (got {self.headroom_slots})")

    @property
    def degrades(self) -> bool:
        return self.policy == "degrade"


def free_tcp_address(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def join_group(config: GroupConfig, device: torch.device | str) -> None:
    """Meet the group's other ranks in rank 0's store (waiting up to meet_timeout_s) and form the process
    group, whose collectives time out after timeout_s."""
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    host, port = config.init_method.removeprefix("tcp://").rsplit(":", 1)
    store = dist.TCPStore(host, int(port), config.world_size, config.rank == 0,
                          timeout=timedelta(seconds=config.meet_timeout_s))
    # Every rank meets here first: forming the group waits only the collective timeout, and a rank may be
    # early by much more (a respawned rank waits while the survivors read their experts).
    _count_in(store, "r1serve/meet", config.world_size, config.meet_timeout_s)
    dist.init_process_group(backend, store=store, world_size=config.world_size, rank=config.rank,
                            timeout=timedelta(seconds=config.timeout_s))


def store_barrier(key: str, count: int, timeout_s: float) -> None:
    """Wait until `count` ranks reached this point, counted in the group's store: no collective, so it waits as
    long as meeting may take (a collective would time out sooner)."""
    _count_in(dist.distributed_c10d._get_default_store(), key, count, timeout_s)


def _count_in(store, key: str, count: int, timeout_s: float) -> None:
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other ranks did not reach {key!r} within {timeout_s:.0f}s")
        time.sleep(0.01)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ExpertParallelLayout:
    """The ExpertLayout of one rank: each MoE layer holds its placement's slots for this rank and
    dispatches with all-to-all. Placements may differ per layer (after balancing)."""

    def __init__(self, config: ModelConfig, rank: int, world_size: int, redundant: int = 0,
                 placements: dict[int, ExpertPlacement] | None = None, mtp: bool = False):
        """`mtp`: the MTP layer's experts are placed too (speculative decoding), like any MoE layer's."""
        self.rank, self.world_size, self.redundant = rank, world_size, redundant
        start = uniform_placement(config.n_routed_experts, world_size, redundant)
        layers = config.expert_layers(mtp)
        self.placements = {layer: start for layer in layers} | {
            layer: p for layer, p in (placements or {}).items() if layer in layers}
        self.dispatchers: dict[int, AllToAllDispatcher] = {}

    def reform(self, rank: int, world_size: int, placements: dict[int, ExpertPlacement]) -> None:
        """This rank's place and every layer's placement in a group formed again without a lost rank."""
        self.rank, self.world_size = rank, world_size
        self.placements = dict(placements)
        first = next(iter(placements.values()))
        self.redundant = len(first.physical_to_logical) - first.num_experts
        for layer, placement in placements.items():
            self.dispatcher(layer).regroup(placement)

    def expert_ids(self, layer: int) -> Sequence[int]:
        return self.placements[layer].rank_experts(self.rank)

    def dispatcher(self, layer: int) -> AllToAllDispatcher:
        if layer not in self.dispatchers:
            self.dispatchers[layer] = AllToAllDispatcher(self.placements[layer])
        return self.dispatchers[layer]
