"""Paged latent KV cache bookkeeping: fixed-size blocks, reference counts and prefix reuse (no torch)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence as Seq

from .sequence import Sequence


def block_hash(parent: int | None, tokens: Seq[int]) -> int:
    """A stable hash of a full block's tokens and everything before it (so equal hashes mean equal prefixes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little", signed=False))
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return int.from_bytes(h.digest(), "little")


def prefix_hashes(tokens: Seq[int], block_size: int) -> list[int]:
    """Hashes of every full block of `tokens`, each chained to the ones before it."""
    hashes, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    used_blocks: int
    free_blocks: int
    cached_free_blocks: int  # free, but still holding a reusable prefix
    prefix_hit_tokens: int
    prefix_query_tokens: int


class BlockManager:
    """Allocates cache blocks to sequences; full blocks are shared between sequences with the same prefix.

    A freed block keeps its hash until it is handed out again, so a later request with the same prefix can
    still reuse it; the least recently freed ones are reused first.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive (got {num_blocks}, {block_size})")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, tokens: Seq[int]) -> list[int]:
        """Blocks already holding a prefix of `tokens`. The block with the last token is never shared:
        its token must run again to produce logits, and that must not write into another sequence's block.
        """
        found = []
        for h in prefix_hashes(tokens[: len(tokens) - 1], self.block_size):
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        cached = self.cached_prefix(seq.token_ids)
        reclaimed = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - len(cached) <= self.num_free_blocks - reclaimed

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """First allocation: reuse cached prefix blocks, then fresh blocks to hold `num_tokens` tokens."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        cached = self.cached_prefix(seq.token_ids)
        for block_id in cached:
            self._take(block_id)
        seq.block_table = list(cached)
        seq.num_cached_tokens = len(cached) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        self.prefix_hit_tokens += seq.num_cached_tokens
        self.prefix_query_tokens += seq.num_tokens
        self.grow(seq, max(num_tokens, seq.num_cached_tokens))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Add fresh blocks until the sequence can hold `num_tokens` tokens."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing > self.num_free_blocks:
            raise MemoryError(f"{seq.request_id}: needs {missing} more KV blocks, {self.num_free_blocks} free")
        for _ in range(missing):
            block_id = next(iter(self._free))
            self._forget(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed blocks (computed and full) for prefix reuse."""
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        bs = self.block_size
        while len(seq.block_hashes) < full:  # only blocks completed since the last commit are hashed
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self._by_hash:
                block.hash = h
                self._by_hash[h] = block.block_id

    def cached_hashes(self, limit: int) -> list[int]:
        """The hashes of the newest `limit` cached prefix blocks, newest last (insertion is commit order)."""
        return list(self._by_hash)[-limit:] if limit > 0 else []

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (newest first, so a prefix's head stays cached the longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def stats(self) -> BlockStats:
        free = self.num_free_blocks
        cached_free = sum(1 for b in self._free if self.blocks[b].hash is not None)
        return BlockStats(len(self.blocks), len(self.blocks) - free, free, cached_free,
                          self.prefix_hit_tokens, self.prefix_query_tokens)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash = None
