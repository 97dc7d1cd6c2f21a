"""Continuous batching: which sequences run in the next step and how many of their tokens (no torch)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 2048
    max_running: int = 64

    def __post_init__(self) -> None:
        if self.max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens: must be positive (got {self.max_batch_tokens})")
        if self.max_running <= 0:
            raise ValueError(f"max_running: must be positive (got {self.max_running})")


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` uncomputed tokens of `seq` run this step, starting at `seq.num_computed_tokens`."""

    seq: Sequence
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk every token is computed, so the step samples the sequence's next token."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    """FCFS continuous batching with chunked prefill under a token budget and preemption by recompute.

    Each step first continues the running sequences (decodes cost one token each, unfinished prompts
    take what budget remains), then admits waiting ones. When the cache cannot hold a running sequence's
    next token, the most recently admitted sequence is preempted: its blocks are freed and it waits to be
    recomputed, keeping every token it has produced.
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Closed by the engine's owner while it must not take on more (a prefill rank whose hand-offs wait
        # to be read): waiting sequences stay waiting, and count as work only once it opens again.
        self.admitting = True

    @property
    def has_work(self) -> bool:
        return bool(self.running or (self.waiting and self.admitting))

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted to make room for an earlier one, or no budget left this step
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n):
                continue
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        while self.admitting and self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break  # head of the queue does not fit yet: keep FCFS order, wait for blocks
            self.waiting.popleft()
            chunks.append(chunk)
            budget -= chunk.num_tokens
        return chunks

    def _admit(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        cached = len(self.blocks.cached_prefix(seq.token_ids)) * self.blocks.block_size
        n = min(seq.num_tokens - cached, budget)
        if not self.blocks.can_allocate(seq, cached + n):
            return None
        self.blocks.allocate(seq, cached + n)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, n)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq` to hold `num_tokens`, preempting the newest other sequences if needed.
        Returns False when `seq` itself had to be preempted."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
