"""A rank's view of expert parallelism: the process group, and per-layer placements and dispatchers."""

from __future__ import annotations

import socket
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

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}) (got {self.rank})")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be positive (got {self.timeout_s})")


def free_tcp_address(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def join_group(config: GroupConfig, device: torch.device | str) -> None:
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=config.init_method, world_size=config.world_size,
                            rank=config.rank, timeout=timedelta(seconds=config.timeout_s))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ExpertParallelLayout:
    """The ExpertLayout of one rank: each MoE layer holds its placement's slots for this rank and
    dispatches with all-to-all. Placements may differ per layer (after balancing)."""

    def __init__(self, config: ModelConfig, rank: int, world_size: int, redundant: int = 0,
                 placements: dict[int, ExpertPlacement] | None = None):
        self.rank, self.world_size, self.redundant = rank, world_size, redundant
        start = uniform_placement(config.n_routed_experts, world_size, redundant)
        self.placements = {layer: start for layer in config.moe_layers} | (placements or {})
        self.dispatchers: dict[int, AllToAllDispatcher] = {}

    def expert_ids(self, layer: int) -> Sequence[int]:
        return self.placements[layer].rank_experts(self.rank)

    def dispatcher(self, layer: int) -> AllToAllDispatcher:
        if layer not in self.dispatchers:
            self.dispatchers[layer] = AllToAllDispatcher(self.placements[layer])
        return self.dispatchers[layer]
