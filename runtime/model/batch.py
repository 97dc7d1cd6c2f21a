"""One forward step's input: tokens of several sequences packed together, and the block tables of their caches.

The cache of a layer is one [num_blocks * block_size, latent_dim] tensor; a sequence's tokens live in the
blocks of its block table, in position order (slot = block * block_size + offset). A list of slots is
the block table of a cache whose blocks hold one token (block_size 1), which is how tests and the
plain generator address it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .uploads import upload

GroupKind = Literal["decode", "prefill"]


@dataclass(frozen=True)
class SequenceChunk:
    """The new tokens of one sequence in this step.

    `block_table` lists the cache blocks of the sequence's context after this step (cached tokens first,
    then the new ones, which are its last `len(token_ids)` positions); `context_len` is that context's
    length, by default every slot of the table.
    """

    token_ids: Sequence[int]
    block_table: Sequence[int]
    want_logits: bool = True
    context_len: int | None = None


@dataclass(frozen=True)
class AttentionGroup:
    """Prompt chunks padded together for the torch attention path.

    query_index, query_valid, query_positions: [G, Lq] (query_index points into the packed tokens);
    context_slots: [G, Lk], padded with slot 0 beyond each context (masked out).
    """

    kind: GroupKind
    query_index: torch.Tensor
    query_valid: torch.Tensor
    query_positions: torch.Tensor
    context_slots: torch.Tensor
    # Every member's context is exactly its new tokens (no cached prefix): the mask is plain causal from
    # position 0, which fused attention kernels apply without a mask tensor and skip the upper half of.
    from_start: bool = False

    def attention_mask(self) -> torch.Tensor:
        """[G, 1, Lq, Lk] bool: a query sees the context up to and including its own position."""
        keys = torch.arange(self.context_slots.shape[1], device=self.context_slots.device)
        return (keys[None, None, :] <= self.query_positions[:, :, None])[:, None]

    @property
    def token_rows(self) -> torch.Tensor:
        """[Tg] packed rows of this group's tokens, in the order `query_valid` selects them."""
        return self.query_index[self.query_valid]


@dataclass(frozen=True)
class DecodeRows:
    """The tokens a step attends as decodes: their packed rows and their sequence indices [D].

    Both are None when every token of the step is a single-token decode (rows = sequences = 0 .. D-1): the
    shape a captured CUDA graph replays, where the batch's block tables are used as they are, without a
    gather. A short chunk of several tokens (speculative decoding's verification: the last token and its
    drafts) attends as that many decode rows of one sequence, each over the context up to its own position:
    `lengths` [D] then gives each row's context length.
    """

    rows: torch.Tensor | None
    seqs: torch.Tensor | None
    lengths: torch.Tensor | None = None

    def of(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """The decodes' rows of a per-sequence tensor (block tables, context lengths)."""
        return per_sequence if self.seqs is None else per_sequence[self.seqs]

    def context_lens(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Each decode row's context length: its sequence's, or up to its own position in a short chunk."""
        return self.of(per_sequence) if self.lengths is None else self.lengths


@dataclass(frozen=True)
class ForwardBatch:
    """Packed tokens of B sequences (T in all).

    input_ids, positions, slot_mapping (where each new token's latent is written): [T];
    block_tables [B, max_blocks] int32 and context_lens [B] int32 describe every sequence's context;
    logits_indices [N]: the rows whose logits are wanted. Decodes are attended through the block tables
    (a paged kernel reads them directly); prompt chunks form a padded group for the torch path.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    block_size: int
    decode: DecodeRows | None
    prefill: AttentionGroup | None
    logits_indices: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def groups(self) -> tuple[AttentionGroup, ...]:
        return () if self.prefill is None else (self.prefill,)

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> ForwardBatch:
        """No tokens: what a data-parallel rank with no work runs so that its group's collectives match."""
        none = torch.zeros(0, dtype=torch.long, device=device)
        tables = torch.zeros(0, 1, dtype=torch.int32, device=device)
        return cls(none, none, none, tables, none.int(), 1, None, None, none)

    @classmethod
    def build(cls, chunks: Sequence[SequenceChunk], device: torch.device | str = "cpu",
              block_size: int = 1, decode_up_to: int = 1) -> ForwardBatch:
        """From per-sequence lists (tests, the plain generator); the engine builds from tensors (`paged`)."""
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence")
        width = max(len(c.block_table) for c in chunks)
        tables = torch.zeros(len(chunks), max(width, 1), dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            tables[row, : len(chunk.block_table)] = torch.as_tensor(chunk.block_table, dtype=torch.int32)
        context_lens = [len(c.block_table) * block_size if c.context_len is None else c.context_len for c in chunks]
        for i, (chunk, k) in enumerate(zip(chunks, context_lens)):
            if k > len(chunk.block_table) * block_size:
                raise ValueError(f"sequence {i}: a context of {k} tokens does not fit its "
                                 f"{len(chunk.block_table)} blocks of {block_size}")
        return cls.paged(
            input_ids=torch.as_tensor([t for c in chunks for t in c.token_ids], dtype=torch.long),
            query_lens=[len(c.token_ids) for c in chunks],
            context_lens=context_lens,
            block_tables=tables,
            block_size=block_size,
            want_logits=[c.want_logits for c in chunks],
            device=device,
            decode_up_to=decode_up_to,
        )

    @classmethod
    def paged(cls, input_ids: torch.Tensor, query_lens: Sequence[int], context_lens: Sequence[int],
              block_tables: torch.Tensor, block_size: int, want_logits: Sequence[bool],
              device: torch.device | str, decode_up_to: int = 1) -> ForwardBatch:
        """input_ids [T] (host), block_tables [B, max_blocks] int32 (host or device): the step's batch.

        Chunks of at most `decode_up_to` tokens attend as decode rows (one per token, through the block
        table), longer ones as prompt chunks. Per-token values are computed with whole-batch tensor
        operations; only prompt chunks (which need the padded group) loop over their own sequences.
        """
        if not len(query_lens):
            raise ValueError("a forward batch needs at least one sequence")
        q_lens = torch.as_tensor(query_lens, dtype=torch.long)
        k_lens = torch.as_tensor(context_lens, dtype=torch.long)
        bad = ((q_lens == 0) | (q_lens > k_lens)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"sequence {i}: {int(q_lens[i])} new tokens with a context of {int(k_lens[i])}")
        num_tokens = int(q_lens.sum())
        seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens, output_size=num_tokens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        positions = (k_lens - q_lens)[seq_of_token] + torch.arange(num_tokens) - starts[seq_of_token]
        to_device = functools.partial(upload, device=device)
        block_tables = to_device(block_tables)
        positions_d = to_device(positions)
        seq_d = to_device(seq_of_token)
        blocks = block_tables[seq_d, positions_d // block_size].long()
        is_decode = q_lens <= decode_up_to
        decode = None
        if bool(is_decode.any()):
            if bool((q_lens == 1).all()):
                decode = DecodeRows(None, None)
            elif bool((q_lens[is_decode] == 1).all()):
                seqs = is_decode.nonzero().squeeze(1)
                decode = DecodeRows(to_device(starts[seqs]), to_device(seqs))
            else:  # short chunks among them: one decode row per token, each seeing up to its own position
                rows = is_decode[seq_of_token].nonzero().squeeze(1)
                decode = DecodeRows(to_device(rows), to_device(seq_of_token[rows]),
                                    to_device((positions[rows] + 1).to(torch.int32)))
        prefill = None
        if not bool(is_decode.all()):
            members = (~is_decode).nonzero().squeeze(1)
            prefill = _prefill_group(members, q_lens, k_lens, starts, block_tables, block_size, device)
        wanted = torch.as_tensor(list(want_logits), dtype=torch.bool)
        return cls(
            input_ids=to_device(input_ids),
            positions=positions_d,
            slot_mapping=blocks * block_size + positions_d % block_size,
            block_tables=block_tables,
            context_lens=to_device(k_lens.to(torch.int32)),
            block_size=block_size,
            decode=decode,
            prefill=prefill,
            logits_indices=to_device((starts + q_lens - 1)[wanted]),
        )


def table_slots(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, max_blocks] block tables -> [B, max_blocks * block_size] slots in position order."""
    offsets = torch.arange(block_size, device=block_tables.device)
    return (block_tables.long()[:, :, None] * block_size + offsets).flatten(1)


def _prefill_group(members, q_lens, k_lens, starts, block_tables, block_size, device) -> AttentionGroup:
    q, k, s = q_lens[members], k_lens[members], starts[members]
    offsets = torch.arange(int(q.max()))[None, :]
    valid = offsets < q[:, None]
    context = table_slots(block_tables[members.to(block_tables.device)], block_size)[:, : int(k.max())]
    to_device = functools.partial(upload, device=device)
    return AttentionGroup(
        kind="prefill",
        query_index=to_device(torch.where(valid, s[:, None] + offsets, 0)),
        query_valid=to_device(valid),
        query_positions=to_device(torch.where(valid, (k - q)[:, None] + offsets, 0)),
        context_slots=context,
        from_start=bool((k == q).all()),
    )
