"""The running sequences' block tables as one host tensor, updated with each sequence's new blocks only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from .sequence import Sequence


@dataclass
class _Row:
    row: int
    known: int  # leading entries of the sequence's block table already in the tensor
    preemptions: int  # a preempted sequence gets a new table: rewrite it


class BlockTables:
    """Rows of a [rows, width] int32 tensor (pinned when the model is on a GPU, so copies to the device
    do not wait), one per sequence the runner has seen and not released.

    A step copies only the blocks a sequence gained since its last step, so the host's work per decode
    step does not grow with the context.
    """

    def __init__(self, width: int, rows: int = 64, pin: bool = False):
        self.width, self.pin = width, pin
        self.table = self._alloc(rows)
        self._rows: dict[str, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))

    def _alloc(self, rows: int) -> torch.Tensor:
        table = torch.zeros(rows, self.width, dtype=torch.int32)
        return table.pin_memory() if self.pin else table

    def rows_for(self, seqs: Seq[Sequence]) -> list[int]:
        """The row of each sequence, brought up to date with its block table."""
        rows = []
        for seq in seqs:
            entry = self._rows.get(seq.request_id)
            blocks = seq.block_table
            if len(blocks) > self.width:
                raise ValueError(f"sequence {seq.request_id!r} holds {len(blocks)} blocks; "
                                 f"tables are {self.width} wide")
            if entry is None:
                entry = self._rows[seq.request_id] = _Row(self._take_row(), 0, seq.num_preemptions)
            elif entry.preemptions != seq.num_preemptions or len(blocks) < entry.known:
                entry.known, entry.preemptions = 0, seq.num_preemptions
            if len(blocks) > entry.known:
                new = blocks[entry.known:]
                self.table[entry.row, entry.known: len(blocks)] = torch.as_tensor(new, dtype=torch.int32)
                entry.known = len(blocks)
            rows.append(entry.row)
        return rows

    def release(self, request_id: str) -> None:
        entry = self._rows.pop(request_id, None)
        if entry is not None:
            self._free.append(entry.row)

    def gather(self, rows: Seq[int], width: int) -> torch.Tensor:
        """[len(rows), width] copy of those rows' first `width` entries (pinned like the table)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        out = torch.empty(len(rows), width, dtype=torch.int32, pin_memory=self.pin)
        return torch.index_select(self.table[:, :width], 0, index, out=out)

    def _take_row(self) -> int:
        if not self._free:  # more sequences than foreseen (hand-offs waiting as well): double the rows
            old = self.table
            self.table = self._alloc(2 * old.shape[0])
            self.table[: old.shape[0]] = old
            self._free = list(range(self.table.shape[0] - 1, old.shape[0] - 1, -1))
        return self._free.pop()
