"""Speculative decoding's rules, as pure functions: how a draft token is drawn, and which draft tokens the
main model keeps (with the token that follows them).

A greedy request keeps each draft token while it equals the main model's argmax at its position, then takes
the argmax after the last one kept: exactly the tokens plain greedy decoding gives. A sampled request keeps
draft token d drawn from q with probability min(1, p(d) / q(d)), where p is the main model's distribution
at that position; at the first one refused it draws from the residual max(0, p - q) renormalised, and after
the last draft token it draws from p. Each token out is then distributed exactly as p (the standard
speculative sampling rule), whatever the draft model is: a poor draft costs speed, never the distribution.
p and q are both the request's filtered distributions (temperature, top-k, top-p, min-p), so what is kept
follows the same filters as without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .sampler import filtered_probs
from .sampling import SamplingParams

__all__ = ["accept_greedy", "accept_sampled", "draft_token", "vocab_probs"]


def vocab_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """[R, V] logits -> [R, V] float32 probabilities in vocabulary order, after the request's filters."""
    probs, order = filtered_probs(logits, [params] * logits.shape[0])
    if order is None:
        return probs
    return torch.zeros_like(probs).scatter_(1, order, probs)


def draft_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None
                ) -> tuple[int, Tensor | None]:
    """One draft token from the draft model's [V] logits: the argmax for a greedy request; for a sampled one
    a draw from its filtered distribution, returned with it (the acceptance rule needs q)."""
    if params.is_greedy:
        return int(logits.argmax()), None
    q = vocab_probs(logits[None], params)[0]
    return int(torch.multinomial(q, 1, generator=generator)), q


def accept_greedy(target_logits: Tensor, drafts: Sequence[int]) -> list[int]:
    """target_logits [k+1, V]: the main model's logits at the last known token and at each of the k drafts.
    Returns the tokens the request takes: the drafts kept, then the main model's own next token."""
    if target_logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"need logits at {len(drafts) + 1} positions for {len(drafts)} draft tokens "
                         f"(got {target_logits.shape[0]})")
    best = target_logits.argmax(dim=-1).tolist()
    kept = []
    for position, draft in enumerate(drafts):
        kept.append(best[position])
        if draft != best[position]:
            return kept
    kept.append(best[len(drafts)])
    return kept


def accept_sampled(target_probs: Tensor, draft_probs: Tensor, drafts: Sequence[int],
                   generator: torch.Generator | None) -> list[int]:
    """target_probs [k+1, V] (p at the last known token and at each draft), draft_probs [k, V] (the q each
    draft was drawn from), both in vocabulary order. Returns the tokens the request takes; every random draw
    comes from `generator` (a seeded request's own), so a seeded request repeats itself."""
    if target_probs.shape[0] != len(drafts) + 1 or draft_probs.shape[0] != len(drafts):
        raise ValueError(f"need p at {len(drafts) + 1} positions and q at {len(drafts)} for {len(drafts)} draft "
                         f"tokens (got {target_probs.shape[0]} and {draft_probs.shape[0]})")
    device = target_probs.device
    kept = []
    for position, draft in enumerate(drafts):
        p, q = target_probs[position].float(), draft_probs[position].float()
        u = float(torch.rand((), generator=generator, device=device))
        if u * float(q[draft]) < float(p[draft]):  # kept with probability min(1, p(d) / q(d))
            kept.append(draft)
            continue
        residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q: a refusal has probability 0, so only rounding lands here
            residual = p
        kept.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return kept
    kept.append(int(torch.multinomial(target_probs[len(drafts)].float(), 1, generator=generator)))
    return kept
