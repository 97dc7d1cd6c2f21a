"""One forward step's input: tokens of several sequences packed together, and where their latents live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SequenceChunk:
    """The new tokens of one sequence in this step.

    `context_slots` lists, in position order, the cache slot of every token of the sequence's context
    after this step (cached tokens first, then the new ones); the new tokens are its last entries.
    """

    token_ids: Sequence[int]
    context_slots: Sequence[int]
    want_logits: bool = True


@dataclass(frozen=True)
class ForwardBatch:
    """Packed tokens of B sequences (T in all) and the padded views attention needs.

    input_ids, positions, slot_mapping: [T]; query_index, query_valid, query_positions: [B, Lq];
    context_slots: [B, Lk]; logits_indices: [N] rows of the packed tokens whose logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    query_index: torch.Tensor
    query_valid: torch.Tensor
    query_positions: torch.Tensor
    context_slots: torch.Tensor
    logits_indices: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens)

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, Lq, Lk] bool: a query sees the context up to and including its own position."""
        keys = torch.arange(self.context_slots.shape[1], device=self.context_slots.device)
        return (keys[None, None, :] <= self.query_positions[:, :, None])[:, None]

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], device: torch.device | str = "cpu") -> ForwardBatch:
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        query_lens = tuple(len(c.token_ids) for c in chunks)
        context_lens = tuple(len(c.context_slots) for c in chunks)
        for i, (q, k) in enumerate(zip(query_lens, context_lens)):
            if q == 0 or q > k:
                raise ValueError(f"sequence {i}: {q} new tokens with a context of {k}")
        ids, positions, slots, logits_rows = [], [], [], []
        lq, lk = max(query_lens), max(context_lens)
        query_index = torch.zeros(len(chunks), lq, dtype=torch.long)
        query_positions = torch.zeros(len(chunks), lq, dtype=torch.long)
        context = torch.zeros(len(chunks), lk, dtype=torch.long)
        offset = 0
        for b, chunk in enumerate(chunks):
            q, k = query_lens[b], context_lens[b]
            ids.extend(chunk.token_ids)
            positions.extend(range(k - q, k))
            slots.extend(chunk.context_slots[k - q :])
            query_index[b, :q] = torch.arange(offset, offset + q)
            query_positions[b, :q] = torch.arange(k - q, k)
            context[b, :k] = torch.as_tensor(chunk.context_slots, dtype=torch.long)
            offset += q
            if chunk.want_logits:
                logits_rows.append(offset - 1)
        valid = torch.arange(lq)[None, :] < torch.as_tensor(query_lens)[:, None]
        as_long = lambda xs: torch.as_tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            input_ids=as_long(ids),
            positions=as_long(positions),
            slot_mapping=as_long(slots),
            query_lens=query_lens,
            context_lens=context_lens,
            query_index=query_index.to(device),
            query_valid=valid.to(device),
            query_positions=query_positions.to(device),
            context_slots=context.to(device),
            logits_indices=as_long(logits_rows),
        )
