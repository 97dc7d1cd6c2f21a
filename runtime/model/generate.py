"""Plain batched greedy generation straight on the model: the engine's reference and the offline demo."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .attention import AttentionPath
from .batch import ForwardBatch, SequenceChunk
from .model import DeepseekV3ForCausalLM


def prompt_logits(model: DeepseekV3ForCausalLM, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Logits at every position of each prompt, all prompts in one packed batch -> [len_i, vocab] each."""
    slots = _slot_ranges(prompts, extra=0)
    caches = model.allocate_kv_cache(sum(len(p) for p in prompts))
    batch = ForwardBatch.build([SequenceChunk(p, s) for p, s in zip(prompts, slots)], model.device)
    batch = dataclasses.replace(batch, logits_indices=torch.arange(batch.num_tokens, device=model.device))
    logits = model(batch, caches, path="naive")
    return list(logits.split([len(p) for p in prompts]))


def greedy_generate(
    model: DeepseekV3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_token_ids: Sequence[int] = (),
    decode_path: AttentionPath = "absorbed",
) -> list[list[int]]:
    """Prefill every prompt in one step, then decode all unfinished sequences together, one token a step."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    slots = _slot_ranges(prompts, extra=max_new_tokens)
    caches = model.allocate_kv_cache(sum(len(p) + max_new_tokens for p in prompts))
    batch = ForwardBatch.build([SequenceChunk(p, s[: len(p)]) for p, s in zip(prompts, slots)], model.device)
    next_ids = model(batch, caches).argmax(dim=-1).tolist()
    outputs: list[list[int]] = [[t] for t in next_ids]
    stops = set(stop_token_ids)
    for _ in range(max_new_tokens - 1):
        live = [i for i, out in enumerate(outputs) if out[-1] not in stops and len(out) < max_new_tokens]
        if not live:
            break
        chunks = [
            SequenceChunk([outputs[i][-1]], slots[i][: len(prompts[i]) + len(outputs[i])]) for i in live
        ]
        next_ids = model(ForwardBatch.build(chunks, model.device), caches, path=decode_path).argmax(dim=-1)
        for i, token in zip(live, next_ids.tolist()):
            outputs[i].append(token)
    return outputs


def _slot_ranges(prompts: Sequence[Sequence[int]], extra: int) -> list[list[int]]:
    """A contiguous slot range per sequence, sized for its prompt plus `extra` generated tokens."""
    ranges, start = [], 0
    for p in prompts:
        size = len(p) + extra
        ranges.append(list(range(start, start + size)))
        start += size
    return ranges
