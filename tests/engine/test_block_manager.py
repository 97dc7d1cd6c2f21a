"""Block accounting and prefix reuse on plain data."""

from __future__ import annotations

import pytest

from r1serve.runtime.engine.block_manager import BlockManager, prefix_hashes
from r1serve.runtime.engine.sequence import Sequence


def _seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), len(tokens))


def _computed(blocks: BlockManager, seq: Sequence) -> None:
    seq.num_computed_tokens = seq.num_tokens
    blocks.commit(seq)


def test_allocate_and_free_balance():
    blocks = BlockManager(num_blocks=10, block_size=4)
    seq = _seq(range(10))
    blocks.allocate(seq, 10)
    assert len(seq.block_table) == 3 and blocks.num_free_blocks == 7
    blocks.grow(seq, 13)
    assert len(seq.block_table) == 4
    blocks.free(seq)
    assert blocks.num_free_blocks == 10 and seq.block_table == []
    assert all(b.ref_count == 0 for b in blocks.blocks)


def test_a_shared_prefix_is_reused_and_counted():
    blocks = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(12)) + [99], "a")
    blocks.allocate(first, first.num_tokens)
    _computed(blocks, first)
    second = _seq(list(range(12)) + [42, 43], "b")
    blocks.allocate(second, second.num_tokens)
    assert second.block_table[:3] == first.block_table[:3]
    assert second.num_cached_tokens == 12 and second.num_computed_tokens == 12
    assert [blocks.blocks[b].ref_count for b in first.block_table[:3]] == [2, 2, 2]
    assert blocks.stats().prefix_hit_tokens == 12


def test_the_block_holding_the_last_prompt_token_is_never_shared():
    blocks = BlockManager(num_blocks=16, block_size=4)
    first = _seq(range(8), "a")
    blocks.allocate(first, 8)
    _computed(blocks, first)
    again = _seq(range(8), "b")  # identical prompt: its last token must run again for logits
    blocks.allocate(again, 8)
    assert again.num_cached_tokens == 4
    assert again.block_table[0] == first.block_table[0] and again.block_table[1] != first.block_table[1]


def test_freed_blocks_stay_reusable_until_handed_out_again():
    blocks = BlockManager(num_blocks=4, block_size=4)
    first = _seq(range(9), "a")
    blocks.allocate(first, 9)
    _computed(blocks, first)
    blocks.free(first)
    assert blocks.stats().cached_free_blocks == 2
    later = _seq(list(range(8)) + [7], "b")
    blocks.allocate(later, 9)
    assert later.num_cached_tokens == 8
    other = _seq([500 + i for i in range(4)] + [1], "c")
    assert not blocks.can_allocate(other, 5)  # 1 block free, 2 needed
    blocks.free(later)
    blocks.allocate(other, 5)  # evicts the least recently freed cached blocks
    assert blocks.num_free_blocks == 2


def test_hashes_chain_the_whole_prefix():
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != prefix_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)[1]
    assert prefix_hashes([1, 2, 3], 4) == []


def test_running_out_of_blocks_is_an_error_not_corruption():
    blocks = BlockManager(num_blocks=2, block_size=4)
    seq = _seq(range(8))
    blocks.allocate(seq, 8)
    with pytest.raises(MemoryError, match="needs 1 more KV blocks, 0 free"):
        blocks.grow(seq, 9)
    assert len(seq.block_table) == 2
