"""Decode-only steps replayed from CUDA graphs, one per batch-size bucket, over static input buffers.

A decode step of a few sequences launches a few hundred small kernels per layer; replaying a captured
graph launches them all at once. The graph of a bucket reads its inputs from fixed buffers: a step
copies its batch into them, pads to the bucket with rows that write to a scratch cache block and attend
to it alone, replays, and keeps the live rows' logits (and final hidden states, which the MTP layer drafts
from). Each row is one token with its own block table row and context length: speculative decoding's
verification (a sequence's last token and its draft) runs as two rows of one sequence, each over the context
up to its own position.

The same static path runs eagerly (`capture=False`): that is how it is tested without a GPU, and what
runs when graphs are off. Everything a captured step does must stay on the device: the Triton kernel
path qualifies (its launch sizes depend only on shapes); the torch MoE path reads counts back to the
host, so graphs need `kernels: triton`.
"""

from __future__ import annotations

import logging
import time

import torch

from r1serve.runtime.model.batch import DecodeRows, ForwardBatch
from r1serve.runtime.model.model import DeepseekV3ForCausalLM

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to 256 and every 64 beyond, ending at max_batch: a
    padded row costs about what a live one does, so buckets are dense where batches are common."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += [b for b in range(16, min(max_batch, 256) + 1, 16) if b < max_batch]
    sizes += [b for b in range(320, max_batch, 64)]
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: DeepseekV3ForCausalLM, caches: list[torch.Tensor], *, max_batch: int, width: int,
                 block_size: int, scratch_block: int, capture: bool):
        self.model, self.caches = model, caches
        self.block_size, self.scratch_block, self.width = block_size, scratch_block, width
        self.buckets = batch_buckets(max_batch)
        self.capture_graphs = capture
        device = model.device
        biggest = self.buckets[-1]
        self.input_ids = torch.zeros(biggest, dtype=torch.long, device=device)
        self.positions = torch.zeros(biggest, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(biggest, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(biggest, width, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(biggest, dtype=torch.int32, device=device)
        self.rows = torch.arange(biggest, device=device)
        self._pad_rows(0, biggest)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bucket -> (logits, hidden states)
        self.memory_bytes = 0
        self.capture_s = 0.0

    def fits(self, batch: ForwardBatch) -> bool:
        # One row per sequence (no short chunks of several decode rows): the shape the graphs were captured in.
        return (batch.prefill is None and batch.decode is not None and batch.decode.rows is None
                and batch.num_tokens <= self.buckets[-1]
                and batch.block_tables.shape[1] <= self.width and batch.block_size == self.block_size)

    def bucket(self, size: int) -> int:
        return next(b for b in self.buckets if b >= size)

    def static_batch(self, size: int) -> ForwardBatch:
        """The first `size` rows of the static buffers as a decode-only batch."""
        rows = self.rows[:size]
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
            block_size=self.block_size, decode=DecodeRows(None, rows), prefill=None, logits_indices=rows,
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """logits [B, vocab] of a decode-only batch of B <= the biggest bucket, in row order."""
        return self.run_with_hidden(batch)[0]

    def run_with_hidden(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, vocab], final hidden states [B, hidden]) of a decode-only batch, in row order: views of
        the graph's outputs, valid until the next run."""
        n = batch.num_tokens
        bucket = self.bucket(n)
        self._load(batch)
        # Rows a bigger step left behind would write their latents into live sequences' slots.
        self._pad_rows(n, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits, hidden = self.outputs[bucket]
        else:
            logits, hidden = self._forward(bucket)
        return logits[:n], hidden[:n]

    @torch.inference_mode()
    def _forward(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.hidden_states(self.static_batch(bucket), self.caches)
        return self.model.head(hidden), hidden

    def _load(self, batch: ForwardBatch) -> None:
        n, w = batch.num_tokens, batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        # Entries beyond a row's context are never attended to, so only the live prefix is copied.
        self.block_tables[:n, :w].copy_(batch.block_tables, non_blocking=True)
        self.context_lens[:n].copy_(batch.context_lens, non_blocking=True)

    def _pad_rows(self, start: int, end: int) -> None:
        """Rows start..end: token 0 at position 0, written to and reading only the scratch block."""
        if start >= end:
            return
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = self.scratch_block * self.block_size
        self.block_tables[start:end, 0] = self.scratch_block
        self.context_lens[start:end] = 1

    def capture(self) -> None:
        """Capture every bucket's graph, biggest first so the smaller ones reuse its memory pool."""
        if not self.capture_graphs:
            return
        started = time.monotonic()
        torch.cuda.empty_cache()  # capture empties the cache itself: measure from the same starting point
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in self.buckets:  # warm-up outside capture: Triton compiles, the allocator settles
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        for bucket in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._forward(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        self.capture_s = time.monotonic() - started
        log.info("captured %d decode CUDA graphs (batch %d to %d) in %.1f s, using %.0f MiB of GPU memory",
                 len(self.graphs), self.buckets[0], self.buckets[-1], self.capture_s, self.memory_bytes / 2**20)

    def describe(self) -> str:
        if not self.graphs:
            return "eager (static buffers)" if not self.capture_graphs else "not captured"
        return (f"{len(self.graphs)} graphs, batch {self.buckets[0]}-{self.buckets[-1]}, "
                f"{self.memory_bytes / 2**20:.0f} MiB")

