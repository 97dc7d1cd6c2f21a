"""DeepSeek-V3's multi-token-prediction (MTP) module: the checkpoint's layer `num_hidden_layers`, used as the
draft model of speculative decoding.

At position i it takes the main model's final hidden state h_i (after the final norm, what the output head
reads) and the embedding of the token at i + 1, and predicts the token at i + 2:
x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]), then an ordinary decoder block (MLA attention over the
module's own paged latent cache, and MoE), then shared_head (norm, head). Its cache is addressed by the
same block tables as the main model's: position i of a sequence has the same slot in both.

Its weights stay dequantized whatever the main model's format (the module is one layer of 62). Its routed
experts are placed like a MoE layer's: with expert parallelism each rank holds its share and tokens reach them
through the same all-to-all, so every rank of a group runs the module once per step, as it runs the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .batch import ForwardBatch
from .checkpoint import load_mtp_weights
from .config import ModelConfig
from .layers import RMSNorm, linear
from .moe import ExpertLayout, LocalExperts
from .weights import checkpoint_shapes, expert_of

__all__ = ["MultiTokenPredictor"]


class _SharedHead(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.head = linear(config.hidden_size, config.vocab_size, dtype, device)


class MultiTokenPredictor(nn.Module):
    """Parameter names are the checkpoint's below `model.layers.{num_hidden_layers}.` (routed experts stacked
    as in the main model's MoE layers)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, experts: ExpertLayout | None = None):
        super().__init__()
        from .model import DecoderLayer  # the model module imports this one

        if config.num_nextn_predict_layers < 1:
            raise ValueError("speculative decoding with MTP needs a checkpoint with an MTP layer "
                             "(config.json: num_nextn_predict_layers is 0)")
        if not config.is_moe_layer(config.num_hidden_layers):
            raise ValueError("the MTP layer is expected to be a MoE layer")
        self.config, self.dtype = config, dtype
        self.layer = config.num_hidden_layers
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h, dtype=dtype, device=device)
        self.embed_tokens.requires_grad_(False)
        self.enorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.eh_proj = linear(2 * h, h, dtype, device)
        self.block = DecoderLayer(config, self.layer, dtype, device,
                                  experts or LocalExperts(config.n_routed_experts))
        self.shared_head = _SharedHead(config, dtype, device)

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.layer}."

    def allocate_kv_cache(self, num_slots: int) -> torch.Tensor:
        return torch.zeros(num_slots, self.config.latent_dim, dtype=self.dtype, device=self.eh_proj.weight.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: torch.Tensor, hidden: torch.Tensor, rope, path="auto"
                ) -> torch.Tensor:
        """batch: tokens t_{i+1} at positions i; hidden [T, H]: the main model's h_i for the same rows.
        Writes the module's latents at the batch's slots -> draft logits [len(batch.logits_indices), vocab]."""
        return self.draft_logits(batch, cache, hidden, rope, path)

    def draft_logits(self, batch: ForwardBatch, cache: torch.Tensor, hidden: torch.Tensor, rope, path="auto"
                     ) -> torch.Tensor:
        """`forward` outside inference mode."""
        return self.logits(self.draft_hidden(batch, cache, hidden, rope, path))

    def logits(self, draft_hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits from the normed hidden states `draft_hidden` returns."""
        return torch.nn.functional.linear(draft_hidden, self.shared_head.head.weight)

    def draft_hidden(self, batch: ForwardBatch, cache: torch.Tensor, hidden: torch.Tensor, rope, path="auto"
                     ) -> torch.Tensor:
        """The normed hidden state the output head reads, at the batch's logits rows: what fitting the layer
        differentiates."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(batch.input_ids)), self.hnorm(hidden)], dim=-1))
        cos_sin = rope.cos_sin(batch.positions, self.dtype)
        x = self.block(x, batch, cache, rope, cos_sin, path)
        return self.shared_head.norm(x[batch.logits_indices])

    def local_name(self, name: str) -> str:
        """A checkpoint name of the module -> the parameter's name here."""
        rest = name.removeprefix(self.prefix)
        return rest if rest.split(".")[0] in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head") \
            else "block." + rest

    def reset_buffers(self) -> None:
        """Recompute derived, non-checkpoint buffers (after `to_empty` from the meta device)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def checkpoint_tensors(self):
        """(checkpoint name, tensor) of every weight of the module: the inverse of `load_checkpoint`."""
        from .model import expert_projection

        for name in checkpoint_shapes(self.config, include_mtp=True):
            if not name.startswith(self.prefix):
                continue
            hit = expert_of(name)
            if hit is None:
                local = self.local_name(name)
                yield name, self.get_buffer(local) if local.endswith("e_score_correction_bias") \
                    else self.get_parameter(local)
                continue
            yield name, expert_projection(self.block.mlp.experts, hit[1], hit[2])

    def load_checkpoint(self, checkpoint_dir: str | Path) -> None:
        """Read the module's tensors (validated and dequantized like the main model's) into place: of the routed
        experts, those its layer holds here."""
        from .model import _copy_expert

        held = set(self.block.mlp.experts.expert_ids)
        expected = {name: shape for name, shape in checkpoint_shapes(self.config, include_mtp=True).items()
                    if name.startswith(self.prefix) and ((hit := expert_of(name)) is None or hit[1] in held)}
        loaded = set()
        for name, tensor in load_mtp_weights(checkpoint_dir, self.dtype, num_hidden_layers=self.layer,
                                             include=expected.__contains__, progress=False):
            if tuple(tensor.shape) != tuple(expected[name]):
                raise ValueError(f"{name}: the checkpoint stores shape {tuple(tensor.shape)}; the MTP layer of "
                                 f"this config.json needs {tuple(expected[name])}")
            loaded.add(name)
            hit = expert_of(name)
            if hit is not None:
                experts = self.block.mlp.experts
                _copy_expert(experts.tensors(), experts.expert_ids, hit[1], hit[2], tensor)
                continue
            local = self.local_name(name)
            target = self.get_buffer(local) if local.endswith("e_score_correction_bias") else self.get_parameter(local)
            target.copy_(tensor)
        missing = sorted(set(expected) - loaded)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"speculative decoding with MTP needs {missing[0]}{more}, which the checkpoint does "
                             "not list")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device,
                        experts: ExpertLayout | None = None) -> MultiTokenPredictor:
        with torch.device("meta"):
            module = cls(config, dtype, "meta", experts)
        module.to_empty(device=device)
        module.reset_buffers()
        module.load_checkpoint(checkpoint_dir)
        return module.eval()
