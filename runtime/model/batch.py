"""One forward step's input: tokens of several sequences packed together, and where their latents live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

GroupKind = Literal["decode", "prefill"]


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
class AttentionGroup:
    """Sequences of one kind (single-token decodes, or prompt chunks) padded together for attention.

    query_index, query_valid, query_positions: [G, Lq] (query_index points into the packed tokens);
    context_slots: [G, Lk], padded with slot 0 beyond each context (masked out).
    """

    kind: GroupKind
    query_index: torch.Tensor
    query_valid: torch.Tensor
    query_positions: torch.Tensor
    context_slots: torch.Tensor

    def attention_mask(self) -> torch.Tensor:
        """[G, 1, Lq, Lk] bool: a query sees the context up to and including its own position."""
        keys = torch.arange(self.context_slots.shape[1], device=self.context_slots.device)
        return (keys[None, None, :] <= self.query_positions[:, :, None])[:, None]

    @property
    def token_rows(self) -> torch.Tensor:
        """[Tg] packed rows of this group's tokens, in the order `query_valid` selects them."""
        return self.query_index[self.query_valid]


@dataclass(frozen=True)
class ForwardBatch:
    """Packed tokens of B sequences (T in all), grouped for attention.

    input_ids, positions, slot_mapping: [T]; logits_indices: [N] rows whose logits are wanted.
    Decodes and prompt chunks form separate groups, so that each pays only for its own padding and can
    use the attention path that suits it.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    groups: tuple[AttentionGroup, ...]
    logits_indices: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> ForwardBatch:
        """No tokens: what a data-parallel rank with no work runs so that its group's collectives match."""
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none, none, (), (), (), none)

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], device: torch.device | str = "cpu") -> ForwardBatch:
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        query_lens = tuple(len(c.token_ids) for c in chunks)
        context_lens = tuple(len(c.context_slots) for c in chunks)
        for i, (q, k) in enumerate(zip(query_lens, context_lens)):
            if q == 0 or q > k:
                raise ValueError(f"sequence {i}: {q} new tokens with a context of {k}")
        contexts = [torch.as_tensor(c.context_slots, dtype=torch.long) for c in chunks]
        q_lens, k_lens = torch.tensor(query_lens), torch.tensor(context_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        kinds = {"decode": [b for b, q in enumerate(query_lens) if q == 1]}
        kinds["prefill"] = [b for b, q in enumerate(query_lens) if q > 1]
        groups = tuple(
            _group(kind, members, contexts, q_lens, k_lens, starts, device) for kind, members in kinds.items() if members
        )
        wanted = [b for b, c in enumerate(chunks) if c.want_logits]
        return cls(
            input_ids=torch.cat([torch.as_tensor(c.token_ids, dtype=torch.long) for c in chunks]).to(device),
            positions=torch.cat([torch.arange(k - q, k) for q, k in zip(query_lens, context_lens)]).to(device),
            slot_mapping=torch.cat([ctx[k - q :] for ctx, q, k in zip(contexts, query_lens, context_lens)]).to(device),
            query_lens=query_lens,
            context_lens=context_lens,
            groups=groups,
            logits_indices=(starts + q_lens - 1)[wanted].to(device),
        )


def _group(kind, members, contexts, q_lens, k_lens, starts, device) -> AttentionGroup:
    index = torch.tensor(members)
    q, k, s = q_lens[index], k_lens[index], starts[index]
    offsets = torch.arange(int(q.max()))[None, :]
    valid = offsets < q[:, None]
    context = torch.zeros(len(members), int(k.max()), dtype=torch.long)
    for row, b in enumerate(members):
        context[row, : contexts[b].shape[0]] = contexts[b]
    return AttentionGroup(
        kind=kind,
        query_index=torch.where(valid, s[:, None] + offsets, 0).to(device),
        query_valid=valid.to(device),
        query_positions=torch.where(valid, (k - q)[:, None] + offsets, 0).to(device),
        context_slots=context.to(device),
    )
