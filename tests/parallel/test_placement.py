"""Expert placement as pure functions: divisibility, redundancy, balancing."""

from __future__ import annotations

import random

import pytest

from r1serve.runtime.parallel.placement import (
    ExpertPlacement,
    PlacementError,
    balanced_placement,
    max_rank_load,
    regrown_placement,
    survivor_placement,
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


def test_survivors_keep_their_experts_in_place_and_take_every_lost_one():
    before = uniform_placement(16, 4)
    loads = [float(e + 1) for e in range(16)]
    after = survivor_placement(before, [0, 2, 3], loads, headroom_slots=2)
    assert after.world_size == 3 and after.slots_per_rank == 6  # 4 lost experts over 3 ranks: 2 slots each
    for new_rank, old_rank in enumerate([0, 2, 3]):
        assert after.rank_experts(new_rank)[:4] == before.rank_experts(old_rank)  # nothing they held moves
    assert set(after.physical_to_logical) == set(range(16))
    # the lost experts, heaviest first, go to the least-loaded survivor with room (rank 0 holds the lightest
    # experts); the 2 slots left take extra copies of the busiest experts
    lost_on = {e: r for r in range(3) for e in after.rank_experts(r)[4:] if e in (4, 5, 6, 7)}
    assert lost_on == {7: 0, 6: 0, 5: 1, 4: 1}
    assert sorted(after.rank_experts(2)[4:]) == [14, 15]
    assert survivor_placement(before, [0, 2, 3], loads, headroom_slots=2) == after  # every survivor agrees


def test_redundant_copies_take_over_first_and_need_no_added_slot():
    # rank 3 holds only copies: of experts 2-5 (rank 0's) and 6-7 (rank 1's)
    before = ExpertPlacement(16, 4, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7))
    after = survivor_placement(before, [0, 1, 2], [1.0] * 16, headroom_slots=0)
    assert after.slots_per_rank == before.slots_per_rank
    assert [after.rank_experts(r) for r in range(3)] == [before.rank_experts(r) for r in (0, 1, 2)]


def test_a_loss_beyond_the_headroom_fits_no_placement_and_says_which_field_to_raise():
    before = uniform_placement(16, 4)
    with pytest.raises(PlacementError, match=r"4 expert\(s\) lost their last copy, which needs 2 more slot\(s\) on "
                       r"each of the 3 surviving rank\(s\); experts.failoverHeadroomSlots allows 1$"):
        survivor_placement(before, [0, 1, 2], [1.0] * 16, headroom_slots=1)
    grown = survivor_placement(before, [0, 1, 2], [1.0] * 16, headroom_slots=2)
    with pytest.raises(PlacementError, match=r"allows 2 \(2 already taken by earlier losses\)"):
        survivor_placement(grown, [0, 1], [1.0] * 16, headroom_slots=2, taken=2)
    with pytest.raises(PlacementError, match="no rank survives"):
        survivor_placement(before, [], [1.0] * 16, headroom_slots=8)


def test_a_group_grown_back_holds_the_slots_it_started_with_balanced_by_the_load_seen():
    loads = [float(e % 5) for e in range(16)]
    grown = regrown_placement(loads, 4, redundant=4)
    assert grown == balanced_placement(loads, 4, 4) and grown.slots_per_rank == 5
    assert grown.replicas(4) and len(grown.replicas(4)) == 2  # the busiest experts get the redundant copies
    # Before any load was seen there is nothing to balance: the placement a new group starts from.
    assert regrown_placement([0.0] * 16, 4, redundant=4) == uniform_placement(16, 4, 4)
