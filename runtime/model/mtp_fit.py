"""Fit a checkpoint's MTP layer to its own main model (self-distillation), so that a tiny random checkpoint
has a draft model that drafts what the main model would say: without it, speculative decoding on random
weights accepts almost nothing and a benchmark of it says nothing.

The data are the main model's own greedy continuations of `fit_prompts` (random prompts, fixed by the seed).
At position i the module sees the main model's final hidden state h_i and the token t_{i+1}, and learns the
main model's greedy token at i + 2 (cross-entropy), over the continuations. Its embedding and output head are
the main model's (as in the published checkpoint) and stay fixed; every other weight of the layer learns.
Deterministic for a seed.

What it learns is those continuations: a random model's greedy text is a chaotic walk over 129k tokens,
which one layer cannot predict on prompts it has not seen (the report's held-out agreement says how little).
So a fitted tiny model drafts well exactly on `fit_prompts`, which is what a benchmark of the speculative
machinery (tokens per forward, speed) needs; the acceptance of a real checkpoint's trained layer is
DeepSeek's to report.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .batch import ForwardBatch, SequenceChunk
from .checkpoint import is_fp8_checkpoint
from .generate import greedy_generate
from .model import DeepseekV3ForCausalLM
from .mtp import MultiTokenPredictor

__all__ = ["FitReport", "fit_mtp", "fit_prompts", "fitted"]

FIT_RECORD = "mtp_fit.json"  # beside config.json: what fitted the layer (read to skip fitting twice)


@dataclass(frozen=True)
class FitReport:
    steps: int
    seed: int
    sequences: int
    prompt_tokens: int
    new_tokens: int
    first_loss: float
    last_loss: float
    # The share of positions where the module's argmax is the main model's token two on: over the fitted
    # continuations, and over as many positions of prompts it did not see.
    fitted_agreement: float
    held_out_agreement: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fitted(checkpoint_dir: str | Path, steps: int, seed: int) -> bool:
    """Whether the checkpoint's MTP layer was already fitted with these settings."""
    record = Path(checkpoint_dir) / FIT_RECORD
    if not record.exists():
        return False
    data = json.loads(record.read_text())
    return data.get("steps") == steps and data.get("seed") == seed


def fit_prompts(vocab_size: int, *, seed: int = 0, sequences: int = 32, prompt_tokens: int = 8) -> list[list[int]]:
    """The random prompts whose continuations a fit with `seed` learns."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(1000, min(100000, vocab_size), (sequences, prompt_tokens), generator=gen).tolist()


def fit_mtp(checkpoint_dir: str | Path, *, steps: int = 300, seed: int = 0, sequences: int = 32,
            prompt_tokens: int = 8, new_tokens: int = 40, batch: int = 8, lr: float = 1e-2,
            progress: bool = True) -> FitReport:
    """Fit the MTP layer of the checkpoint at `checkpoint_dir`, from its weights as they are, and write the
    checkpoint again in place (whole, to a temporary folder first, so an interrupted fit leaves the old one).
    The same seed on the same checkpoint fits the same layer."""
    if steps <= 0:
        raise ValueError(f"steps: must be positive (got {steps})")
    directory = Path(checkpoint_dir)
    if is_fp8_checkpoint(directory):
        raise ValueError(f"{directory}: fit-mtp rewrites dequantized checkpoints only (this one stores FP8 weights)")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM.from_checkpoint(directory, torch.float32, progress=False)
    mtp = MultiTokenPredictor.from_checkpoint(directory, model.config, torch.float32, "cpu")
    mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    mtp.shared_head.head.weight.copy_(model.head_weight())
    vocab = model.config.vocab_size
    data = _continuations(model, fit_prompts(vocab, seed=seed, sequences=sequences, prompt_tokens=prompt_tokens),
                          new_tokens)
    held_out = _continuations(model, fit_prompts(vocab, seed=seed + 1000, sequences=batch,
                                                 prompt_tokens=prompt_tokens), new_tokens)
    trained = [p for name, p in mtp.named_parameters() if not name.startswith(("embed_tokens.", "shared_head.head."))]
    for p in trained:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trained, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = _progress(steps, progress)
    for _ in range(steps):
        picked = torch.randperm(len(data), generator=gen)[:batch].tolist()
        with torch.enable_grad():  # whatever the caller set (a benchmark runs without gradients)
            loss, _ = _loss(model, mtp, [data[i] for i in picked], prompt_tokens)
        optimiser.zero_grad()
        with torch.enable_grad():
            loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    for p in trained:
        p.requires_grad_(False)
    with torch.no_grad():
        parts = [data[i: i + batch] for i in range(0, len(data), batch)]
        fitted_agreement = sum(_loss(model, mtp, part, prompt_tokens)[1] * len(part) for part in parts) / len(data)
        held_out_agreement = _loss(model, mtp, held_out, prompt_tokens)[1]
    report = FitReport(steps, seed, sequences, prompt_tokens, new_tokens, losses[0], losses[-1],
                       fitted_agreement, held_out_agreement)
    _write(directory, mtp, report)
    return report


def _continuations(model: DeepseekV3ForCausalLM, prompts: list[list[int]], new_tokens: int
                   ) -> list[tuple[list[int], torch.Tensor]]:
    """(tokens, final hidden states [len, H]) of the prompts continued greedily by the model."""
    outs = greedy_generate(model, prompts, new_tokens)
    return [(prompt + out, _hidden(model, prompt + out)) for prompt, out in zip(prompts, outs)]


def _hidden(model: DeepseekV3ForCausalLM, tokens: list[int]) -> torch.Tensor:
    caches = model.allocate_kv_cache(len(tokens))
    batch = ForwardBatch.build([SequenceChunk(tokens, list(range(len(tokens))))], model.device)
    return model.hidden_states(batch, caches, path="naive")


def _loss(model: DeepseekV3ForCausalLM, mtp: MultiTokenPredictor, items, prompt_tokens: int
          ) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the module's drafts against the main model's greedy tokens two positions on, over the
    continuations (a random prompt's next tokens are not the main model's), and the share it gets right."""
    chunks, targets, hidden, rows, start = [], [], [], [], 0
    for tokens, h in items:
        n = len(tokens) - 1  # positions 0 .. n-1 see tokens 1 .. n
        chunks.append(SequenceChunk(tokens[1:], list(range(start, start + n))))
        hidden.append(h[:n])
        for i in range(prompt_tokens - 1, n - 1):  # t_{i+2} is a generated token
            rows.append(start + i)
            targets.append(tokens[i + 2])
        start += n
    batch = ForwardBatch.build(chunks, model.device)
    batch = dataclasses.replace(batch, logits_indices=torch.tensor(rows))
    cache = mtp.allocate_kv_cache(start)
    logits = mtp.draft_logits(batch, cache, torch.cat(hidden), model.rotary, path="naive")
    target = torch.tensor(targets)
    loss = torch.nn.functional.cross_entropy(logits.float(), target)
    return loss, float((logits.argmax(dim=-1) == target).float().mean())


def _write(directory: Path, mtp: MultiTokenPredictor, report: FitReport) -> None:
    from safetensors.torch import load_file

    from .checkpoint_writer import save_checkpoint

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / shard))
    for name, tensor in mtp.checkpoint_tensors():
        tensors[name] = tensor.to(tensors[name].dtype).contiguous()
    config = json.loads((directory / "config.json").read_text())
    save_checkpoint(directory, tensors, config, overwrite=True)
    (directory / FIT_RECORD).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="fitting the MTP layer", unit="step", disable=not enabled)
