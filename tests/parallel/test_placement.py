"""Expert placement as pure functions: divisibility, redundancy, balancing."""

from __future__ import annotations

import random

import pytest

from r1serve.runtime.parallel.placement import (
    ExpertPlacement,
    PlacementError,
    balanced_placement,
    max_rank_load,
    uniform_placement,
)


def test_uniform_placement_is_contiguous_without_redundancy():
    p = uniform_placement(16, 4)
    assert p.slots_per_rank == 4 and p.rank_experts(1) == (4, 5, 6, 7)
    table, counts = p.replica_table()
    assert counts.tolist() == [1] * 16 and table[5, 0].item() == 5


@pytest.mark.parametrize("experts,redundant,world", [(16, 2, 3), (16, 0, 2), (16, 4, 4), (256, 32, 32)])
def test_every_expert_has_a_slot_and_slots_divide(experts, redundant, world):
    p = uniform_placement(experts, world, redundant)
    assert len(p.physical_to_logical) == experts + redundant
    assert set(p.physical_to_logical) == set(range(experts))
    for r in range(world):
        assert len(set(p.rank_experts(r))) == len(p.rank_experts(r)), "no rank holds two copies of one expert"


def test_indivisible_layouts_are_refused_with_a_suggestion():
    with pytest.raises(PlacementError,
                       match=r"16 experts \+ 0 redundant = 16 slots do not divide over 3 ranks \(add 2"):
        uniform_placement(16, 3)


def test_hot_experts_get_copies_and_the_busiest_rank_gets_lighter():
    rng = random.Random(0)
    loads = [rng.paretovariate(1.2) for _ in range(64)]
    plain = uniform_placement(64, 8, 8)
    balanced = balanced_placement(loads, 8, 8)
    hottest = max(range(64), key=loads.__getitem__)
    assert len(balanced.replicas(hottest)) >= 2
    assert max_rank_load(balanced, loads) < 0.8 * max_rank_load(plain, loads)


def test_placement_is_deterministic():
    loads = [float(i % 7) for i in range(32)]
    assert balanced_placement(loads, 4, 4) == balanced_placement(list(loads), 4, 4)


def test_a_placement_missing_an_expert_is_invalid():
    with pytest.raises(PlacementError, match="missing"):
        ExpertPlacement(4, 2, (0, 1, 1, 2))
