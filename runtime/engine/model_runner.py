"""The only part of the engine that owns the device: the paged latent cache and the model's forward."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from r1serve.runtime.model.batch import ForwardBatch, SequenceChunk
from r1serve.runtime.model.model import DeepseekV3ForCausalLM

from .scheduler import ScheduledChunk
from .sequence import Sequence


class ModelRunner:
    """Runs scheduled chunks; the cache is one [num_blocks * block_size, latent_dim] tensor per layer,
    addressed by slot = block_id * block_size + offset."""

    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int, block_size: int):
        self.model, self.block_size = model, block_size
        self.caches = model.allocate_kv_cache(num_blocks * block_size)
        self._offsets = torch.arange(block_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """[num_tokens] cache slots of the sequence's first `num_tokens` tokens."""
        blocks = torch.as_tensor(seq.block_table, dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._offsets[None, :]).flatten()[:num_tokens]

    def run(self, chunks: Seq[ScheduledChunk]) -> torch.Tensor:
        """One forward step -> logits [number of completing chunks, vocab], in chunk order."""
        batch = ForwardBatch.build(
            [
                SequenceChunk(
                    c.seq.token_ids[c.seq.num_computed_tokens : c.seq.num_computed_tokens + c.num_tokens],
                    self.slots(c.seq, c.seq.num_computed_tokens + c.num_tokens),
                    want_logits=c.completes,
                )
                for c in chunks
            ],
            self.device,
        )
        return self.model(batch, self.caches)

    def run_empty(self) -> None:
        self.model(ForwardBatch.empty(self.device), self.caches)

    def read_latents(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """[num_layers, num_tokens, latent_dim] copy of the sequence's cached latents, on the CPU."""
        slots = self.slots(seq, num_tokens).to(self.device)
        return torch.stack([cache[slots] for cache in self.caches]).cpu()

    def write_latents(self, seq: Sequence, start: int, latents: torch.Tensor) -> None:
        """Store latents [num_layers, n, latent_dim] for the sequence's tokens start .. start + n."""
        slots = self.slots(seq, start + latents.shape[1])[start:].to(self.device)
        for cache, layer in zip(self.caches, latents, strict=True):
            cache[slots] = layer.to(device=cache.device, dtype=cache.dtype)
