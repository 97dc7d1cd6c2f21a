"""The only part of the engine that owns the device: the paged latent cache, block tables, and the forward."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence as Seq

import torch

from r1serve.runtime.model.batch import ForwardBatch
from r1serve.runtime.model.kernels import KernelPath
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.model.uploads import upload

from .block_tables import BlockTables
from .decode_graphs import DecodeGraphs
from .scheduler import ScheduledChunk
from .sequence import Sequence

log = logging.getLogger(__name__)

# The longest chunk speculative decoding verifies: the last token and one draft.
SPECULATIVE_CHUNK = 2


@dataclass(frozen=True)
class RunnerPaths:
    """How the runner executes: the kernel path and whether decode steps replay CUDA graphs."""

    kernels: KernelPath = "torch"
    cuda_graphs: bool = False
    # Run decode steps through the static buffers even without graphs (how CPU tests cover that path).
    static_decode: bool = False


class ModelRunner:
    """Runs scheduled chunks; the cache is one [(num_blocks + 1) * block_size, latent_dim] tensor per layer,
    addressed by slot = block_id * block_size + offset. The extra block is scratch space that the
    padding rows of a replayed decode graph write to; the scheduler never hands it out."""

    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int, block_size: int, *,
                 max_running: int = 64, max_model_len: int | None = None, paths: RunnerPaths = RunnerPaths(),
                 mtp: bool = False):
        """`mtp`: the model's MTP module drafts tokens, with its own cache (one layer, the same slots)."""
        self.model, self.block_size, self.paths = model, block_size, paths
        model.set_kernels(paths.kernels)
        self.caches = model.allocate_kv_cache((num_blocks + 1) * block_size)
        self.mtp_cache = model.mtp.allocate_kv_cache((num_blocks + 1) * block_size) if mtp else None
        self.scratch_block = num_blocks
        max_len = max_model_len or model.config.max_position_embeddings
        self.table_width = min(-(-max_len // block_size), num_blocks)
        on_gpu = self.device.type == "cuda"
        self.tables = BlockTables(self.table_width, rows=max_running, pin=on_gpu)
        self._offsets = torch.arange(block_size)
        self.graphs: DecodeGraphs | None = None
        if paths.cuda_graphs or paths.static_decode:
            # With drafts, a sequence verifies its last token and its draft: two rows.
            rows = max_running * (SPECULATIVE_CHUNK if mtp else 1)
            self.graphs = DecodeGraphs(model, self.caches, max_batch=rows, width=self.table_width,
                                       block_size=block_size, scratch_block=self.scratch_block,
                                       capture=paths.cuda_graphs)
            self.graphs.capture()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def describe(self) -> dict[str, str]:
        """What the start-up log and `r1serve status` show about how this engine runs."""
        if not self.paths.cuda_graphs:
            graphs = "off"
        else:
            graphs = self.graphs.describe()
        description = {"device": str(self.device), "kernels": self.paths.kernels, "cudaGraphs": graphs,
                       "weights": self.model.weight_format}
        if self.mtp_cache is not None:
            description["speculative"] = "mtp (1 draft token)"
        return description

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """[num_tokens] cache slots of the sequence's first `num_tokens` tokens."""
        blocks = torch.as_tensor(seq.block_table, dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._offsets[None, :]).flatten()[:num_tokens]

    def run(self, chunks: Seq[ScheduledChunk], *, want_logits: Seq[bool] | None = None,
            input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One forward step -> logits [number of chunks that want them, vocab], in chunk order.

        By default the chunks that complete their sequence want logits. `input_ids` (on the device)
        replaces the tokens read from the sequences: a decode step that follows the previous step's
        sampled tokens before the host has them.
        """
        want = [c.completes for c in chunks] if want_logits is None else list(want_logits)
        batch = self.build_batch(chunks, want, input_ids)
        if self.graphs is not None and self.graphs.fits(batch):
            logits = self.graphs.run(batch)
            return logits if all(want) else logits[batch.logits_indices]  # rows = sequences here
        return self.model(batch, self.caches)

    def build_batch(self, chunks: Seq[ScheduledChunk], want_logits: Seq[bool],
                    input_ids: torch.Tensor | None = None, decode_up_to: int = 1) -> ForwardBatch:
        if input_ids is None:
            ids = [t for c in chunks
                   for t in c.seq.token_ids[c.seq.num_computed_tokens: c.seq.num_computed_tokens + c.num_tokens]]
            input_ids = torch.tensor(ids, dtype=torch.long, pin_memory=self.device.type == "cuda")
        return self._paged([(c.seq, c.seq.num_computed_tokens, c.num_tokens) for c in chunks], input_ids,
                           want_logits, decode_up_to)

    def _paged(self, spans: Seq[tuple[Sequence, int, int]], input_ids: torch.Tensor, want_logits: Seq[bool],
               decode_up_to: int) -> ForwardBatch:
        """The batch of positions [first, first + n) of each (sequence, first, n), through their block tables."""
        rows = self.tables.rows_for([seq for seq, _, _ in spans])
        context_lens = [first + n for _, first, n in spans]
        width = -(-max(context_lens) // self.block_size)
        return ForwardBatch.paged(input_ids, [n for _, _, n in spans], context_lens, self.tables.gather(rows, width),
                                  self.block_size, want_logits, self.device, decode_up_to)

    def run_with_hidden(self, chunks: Seq[ScheduledChunk], input_ids: list[int], logit_rows: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A forward over `input_ids` (the chunks' tokens, packed; a chunk may run tokens the sequence does not
        hold yet: draft tokens) -> (logits at the packed rows `logit_rows`, final hidden state of every row)."""
        # A sequence's last token and its draft attend as decode rows (the absorbed path, through the block
        # table), as a plain decode step's token does: replayed from the decode graphs where every chunk is
        # that short, each token a row of its own.
        if self.graphs is not None and all(c.num_tokens <= SPECULATIVE_CHUNK for c in chunks):
            rows = self._token_rows(chunks, torch.tensor(input_ids, dtype=torch.long))
            if self.graphs.fits(rows):
                logits, hidden = self.graphs.run_with_hidden(rows)
                return logits[upload(logit_rows, self.device, torch.long)], hidden
        batch = self.build_batch(chunks, [False] * len(chunks), torch.tensor(input_ids, dtype=torch.long),
                                 decode_up_to=SPECULATIVE_CHUNK)
        batch = replace(batch, logits_indices=upload(logit_rows, self.device, torch.long))
        hidden = self.model.hidden_states(batch, self.caches)
        return self.model.head(hidden[batch.logits_indices]), hidden

    def _token_rows(self, chunks: Seq[ScheduledChunk], input_ids: torch.Tensor) -> ForwardBatch:
        """The chunks' tokens as a decode-only batch of one row per token: its sequence's block table, and the
        context up to its own position."""
        spans = [(c.seq, c.seq.num_computed_tokens + j, 1) for c in chunks for j in range(c.num_tokens)]
        return self._paged(spans, input_ids, [True] * len(spans), decode_up_to=1)

    def run_mtp(self, spans: Seq[tuple[Sequence, int, int]], input_ids: list[int], hidden: torch.Tensor,
                want_logits: Seq[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over positions [first, first + n) of each (sequence, first, n), with the tokens one
        position later (`input_ids`, packed) and the main model's hidden states there -> (draft logits, the
        module's normed hidden states they come from) of the spans that want them, at their last position."""
        batch = self._paged(spans, torch.tensor(input_ids, dtype=torch.long), want_logits, SPECULATIVE_CHUNK)
        with torch.inference_mode():
            rows = self.model.mtp.draft_hidden(batch, self.mtp_cache, hidden, self.model.rotary)
            return self.model.mtp.logits(rows), rows

    def release(self, seq: Sequence) -> None:
        """The sequence left the engine (finished, aborted or handed off): its table row is free."""
        self.tables.release(seq.request_id)

    def run_empty(self) -> None:
        self.model(ForwardBatch.empty(self.device), self.caches)

    def run_mtp_empty(self) -> None:
        """The MTP module over no tokens: its MoE's collectives, for a rank of a group that drafts nothing."""
        hidden = torch.zeros(0, self.model.config.hidden_size, dtype=self.model.dtype, device=self.device)
        self.model.mtp(ForwardBatch.empty(self.device), self.mtp_cache, hidden, self.model.rotary)

    @property
    def handed_off_caches(self) -> list[torch.Tensor]:
        """The caches a hand-off carries: every layer's, then the MTP module's where it drafts."""
        return self.caches + ([self.mtp_cache] if self.mtp_cache is not None else [])

    def read_latents(self, seq: Sequence, num_tokens: int, to_host: bool = True) -> torch.Tensor:
        """[layers, num_tokens, latent_dim] copy of the sequence's cached latents (`handed_off_caches`), on the
        CPU (or left on the device)."""
        slots = self.slots(seq, num_tokens).to(self.device)
        latents = torch.stack([cache[slots] for cache in self.handed_off_caches])
        return latents.cpu() if to_host else latents

    def write_latents(self, seq: Sequence, start: int, latents: torch.Tensor) -> None:
        """Store latents [layers, n, latent_dim] (`handed_off_caches`) for the sequence's tokens start .. start + n."""
        slots = self.slots(seq, start + latents.shape[1])[start:].to(self.device)
        for cache, layer in zip(self.handed_off_caches, latents, strict=True):
            cache[slots] = layer.to(device=cache.device, dtype=cache.dtype)


class HostCopy:
    """A device tensor's copy into pinned host memory, started now and waited for on `wait`."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.ready: torch.cuda.Event | None = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = tensor, None

    def wait(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
