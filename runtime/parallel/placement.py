"""Which rank holds which experts: logical experts mapped to physical slots, redundant copies, balancing."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import torch


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class ExpertPlacement:
    """Physical slot s lives on rank s // slots_per_rank and holds logical expert physical_to_logical[s].

    Every logical expert has at least one slot; with `redundant` extra slots the busiest have more.
    """

    num_experts: int
    world_size: int
    physical_to_logical: tuple[int, ...]

    def __post_init__(self) -> None:
        slots = len(self.physical_to_logical)
        if self.world_size <= 0 or slots % self.world_size:
            raise PlacementError(f"{slots} slots cannot be split evenly over {self.world_size} ranks")
        held = set(self.physical_to_logical)
        if held != set(range(self.num_experts)):
            missing = sorted(set(range(self.num_experts)) - held)
            raise PlacementError(f"every expert needs a slot; missing {missing[:8]}")

    @property
    def slots_per_rank(self) -> int:
        return len(self.physical_to_logical) // self.world_size

    @property
    def redundant(self) -> int:
        return len(self.physical_to_logical) - self.num_experts

    def rank_experts(self, rank: int) -> tuple[int, ...]:
        """Logical experts in rank's slots, in slot order (what that rank loads)."""
        n = self.slots_per_rank
        return self.physical_to_logical[rank * n : (rank + 1) * n]

    def replicas(self, expert: int) -> list[int]:
        return [s for s, e in enumerate(self.physical_to_logical) if e == expert]

    def replica_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [num_experts, max_copies] physical slots padded with -1, counts [num_experts])."""
        copies = [self.replicas(e) for e in range(self.num_experts)]
        width = max(len(c) for c in copies)
        # Explicitly on the CPU: models are built under a meta-device context before their weights load.
        table = torch.full((self.num_experts, width), -1, dtype=torch.long, device="cpu")
        for e, slots in enumerate(copies):
            table[e, : len(slots)] = torch.tensor(slots, device="cpu")
        return table, torch.tensor([len(c) for c in copies], device="cpu")


def check_divisible(num_experts: int, redundant: int, world_size: int) -> int:
    if redundant < 0:
        raise PlacementError(f"redundant: must be >= 0 (got {redundant})")
    if world_size <= 0:
        raise PlacementError(f"world_size: must be positive (got {world_size})")
    total = num_experts + redundant
    if total % world_size:
        fit = -total % world_size
        raise PlacementError(
            f"{num_experts} experts + {redundant} redundant = {total} slots do not divide over {world_size} ranks "
            f"(add {fit} redundant slots, or choose another rank count)"
        )
    return total // world_size


def uniform_placement(num_experts: int, world_size: int, redundant: int = 0) -> ExpertPlacement:
    """Before any load is known: experts in order, a contiguous range per rank, and the redundant slots
    (at the end, so on the last ranks) holding copies of the first experts, which live on the first ranks."""
    check_divisible(num_experts, redundant, world_size)
    copies = [e % num_experts for e in range(redundant)]
    return ExpertPlacement(num_experts, world_size, tuple(range(num_experts)) + tuple(copies))


def balanced_placement(loads: Sequence[float], world_size: int, redundant: int = 0) -> ExpertPlacement:
    """EPLB-style: give extra copies to the experts with the most load per copy, then pack the copies
    onto ranks heaviest first, each to the least-loaded rank with a free slot (avoiding a second copy of
    the same expert on one rank where possible). Deterministic: every rank computes the same result."""
    num_experts = len(loads)
    slots_per_rank = check_divisible(num_experts, redundant, world_size)
    copies = [1] * num_experts
    heap = [(-float(load), e) for e, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(redundant):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        heapq.heappush(heap, (-float(loads[e]) / copies[e], e))
    items = sorted(((float(loads[e]) / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    rank_load = [0.0] * world_size
    rank_items: list[list[int]] = [[] for _ in range(world_size)]
    for load, e in items:
        open_ranks = [r for r in range(world_size) if len(rank_items[r]) < slots_per_rank]
        fresh = [r for r in open_ranks if e not in rank_items[r]] or open_ranks
        target = min(fresh, key=lambda r: (rank_load[r], r))
        rank_items[target].append(e)
        rank_load[target] += load
    physical = tuple(e for r in range(world_size) for e in sorted(rank_items[r]))
    return ExpertPlacement(num_experts, world_size, physical)


def max_rank_load(placement: ExpertPlacement, loads: Sequence[float]) -> float:
    """The busiest rank's load when each expert's tokens split evenly over its copies."""
    copies = [len(placement.replicas(e)) for e in range(placement.num_experts)]
    per_rank = [
        sum(loads[e] / copies[e] for e in placement.rank_experts(r)) for r in range(placement.world_size)
    ]
    return max(per_rank)


def survivor_placement(placement: ExpertPlacement, alive: Sequence[int], loads: Sequence[float],
                       headroom_slots: int, taken: int = 0) -> ExpertPlacement:
    """The placement of a group that lost ranks: the ranks in `alive` (in the new group's order) keep the
    experts they hold in their first slots, so nothing they hold moves or loads again; every expert left
    without a copy goes to a slot added after them, heaviest first to the least-loaded survivor. Every
    survivor gets the same number of added slots (each rank holds as many slots as the others); those the lost
    experts leave free take copies of the experts with the most load per copy, as redundant slots do.
    Raises PlacementError when the lost experts need more than `headroom_slots` added slots per survivor, of
    which earlier losses `taken` some. Deterministic: every survivor computes the same result."""
    if not alive:
        raise PlacementError("no rank survives to hold the experts")
    kept = [placement.rank_experts(rank) for rank in alive]
    held = {e for experts in kept for e in experts}
    lost = [e for e in range(placement.num_experts) if e not in held]
    added = -(-len(lost) // len(alive))
    if added > headroom_slots - taken:
        earlier = f" ({taken} already taken by earlier losses)" if taken else ""
        raise PlacementError(
            f"no placement fits: {len(lost)} expert(s) lost their last copy, which needs {added} more slot(s) on "
            f"each of the {len(alive)} surviving rank(s); experts.failoverHeadroomSlots allows {headroom_slots}"
            f"{earlier}")
    copies = [0] * placement.num_experts
    for experts in kept:
        for e in experts:
            copies[e] += 1
    rank_items = [list(experts) for experts in kept]
    rank_load = [sum(float(loads[e]) for e in experts) for experts in kept]  # refined below as copies grow
    free = [added] * len(alive)

    def place(e: int) -> None:
        open_ranks = [r for r in range(len(alive)) if free[r]]
        fresh = [r for r in open_ranks if e not in rank_items[r]] or open_ranks
        target = min(fresh, key=lambda r: (rank_load[r], r))
        rank_items[target].append(e)
        rank_load[target] += float(loads[e]) / (copies[e] + 1)
        free[target] -= 1
        copies[e] += 1

    for e in sorted(lost, key=lambda e: (-float(loads[e]), e)):
        place(e)
    heap = [(-float(loads[e]) / copies[e], e) for e in range(placement.num_experts)]
    heapq.heapify(heap)
    for _ in range(sum(free)):
        _, e = heapq.heappop(heap)
        place(e)
        heapq.heappush(heap, (-float(loads[e]) / copies[e], e))
    return ExpertPlacement(placement.num_experts, len(alive), tuple(e for items in rank_items for e in items))


def regrown_placement(loads: Sequence[float], world_size: int, redundant: int = 0) -> ExpertPlacement:
    """The placement of a group grown back to its full size: balanced from the load seen (every expert loads
    again from where it is cheapest to hold), or uniform before any load was seen."""
    if any(loads):
        return balanced_placement(loads, world_size, redundant)
    return uniform_placement(len(loads), world_size, redundant)
