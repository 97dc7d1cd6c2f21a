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
        lq, lk = max(query_lens), max(context_lens)
        context = torch.zeros(len(chunks), lk, dtype=torch.long)
        ids, positions, slots = [], [], []
        for b, chunk in enumerate(chunks):
            q, k = query_lens[b], context_lens[b]
            context[b, :k] = torch.as_tensor(chunk.context_slots, dtype=torch.long)
            ids.append(torch.as_tensor(chunk.token_ids, dtype=torch.long))
            positions.append(torch.arange(k - q, k))
            slots.append(context[b, k - q : k])
        q_lens, k_lens = torch.tensor(query_lens), torch.tensor(context_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        offsets = torch.arange(lq)[None, :]
        valid = offsets < q_lens[:, None]
        query_index = torch.where(valid, starts[:, None] + offsets, 0)
        query_positions = torch.where(valid, (k_lens - q_lens)[:, None] + offsets, 0)
        wanted = [b for b, c in enumerate(chunks) if c.want_logits]
        return cls(
            input_ids=torch.cat(ids).to(device),
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat(slots).to(device),
            query_lens=query_lens,
            context_lens=context_lens,
            query_index=query_index.to(device),
            query_valid=valid.to(device),
            query_positions=query_positions.to(device),
            context_slots=context.to(device),
            logits_indices=(starts + q_lens - 1)[wanted].to(device),
        )
