"""Next-token sampling for a batch whose rows each carry their own SamplingParams."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.uploads import upload

__all__ = ["filtered_probs", "make_generator", "sample"]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator owned by one seeded request (None for unseeded requests: they share the default)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> Tensor:
    """Pick one token per row.

    logits: [B, V], any float dtype. params, generators: length B. Returns [B] long on logits.device.
    Greedy rows take the argmax; the others are filtered (top-k, top-p, min-p) at their temperature and
    drawn with their own generator, so a seeded row's draws do not depend on the rest of the batch.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab] (got shape {tuple(logits.shape)})")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"need one SamplingParams and one generator per row: {batch} rows, "
            f"{len(params)} params, {len(generators)} generators"
        )
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if len(greedy) == batch:  # the common serving case: no row gathers, no copy of the logits
        return logits.argmax(dim=-1)
    tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy:
        index = upload(greedy, logits.device, torch.long)
        tokens[index] = logits[index].argmax(dim=-1)
    if sampled:
        index = upload(sampled, logits.device, torch.long)
        chosen = [params[i] for i in sampled]
        probs, order = filtered_probs(logits[index], chosen)
        picked = _draw(probs, [generators[i] for i in sampled])
        tokens[index] = picked if order is None else order.gather(1, picked[:, None]).squeeze(1)
    return tokens


def filtered_probs(logits: Tensor, params: Sequence[SamplingParams]) -> tuple[Tensor, Tensor | None]:
    """Temperature, then top-k, top-p and min-p, each row with its own values.

    logits: [R, V]. Returns (probs [R, V] float32, order [R, V] long or None). When a filter is active
    the probabilities are in descending order and ``order`` maps those positions back to token ids;
    otherwise they are in vocabulary order and ``order`` is None (no sort needed).
    """
    device = logits.device
    temperature = upload([p.temperature for p in params], device, torch.float32)
    scaled = logits.float() / temperature[:, None]
    vocab = scaled.shape[1]
    # A disabled filter becomes a no-op value so rows with different filters share one pass.
    top_k = [p.top_k if p.top_k_enabled and p.top_k < vocab else vocab for p in params]
    # top_p == 1 must keep the whole tail even where the cumulative sum rounds up to 1 early.
    top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]
    min_p = [p.min_p for p in params]
    if all(k == vocab for k in top_k) and all(p > 1.0 for p in top_p) and not any(min_p):
        return torch.softmax(scaled, dim=-1), None
    # stable=True keeps equal logits in id order, so top_k=1 picks the same token as argmax.
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab, device=device)[None, :] < upload(top_k, device, torch.long)[:, None]
    ordered = ordered.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # Nucleus: keep a token while the mass strictly before it is below top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= mass_before < upload(top_p, device, torch.float32)[:, None]
    # min-p compares with the most likely token; renormalising keeps that ratio, so order is irrelevant.
    threshold = probs[:, :1] * upload(min_p, device, torch.float32)[:, None]
    keep &= probs >= threshold
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    return probs, order


def _draw(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """probs: [R, V]. One multinomial draw per row: seeded rows with their own generator, one call for the rest."""
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        index = upload(shared, probs.device, torch.long)
        picked[index] = torch.multinomial(probs[index], 1).squeeze(1)
    for i, generator in enumerate(generators):
        if generator is not None:
            picked[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return picked
