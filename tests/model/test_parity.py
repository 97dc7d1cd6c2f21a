"""r1serve's model against transformers' DeepseekV3ForCausalLM on the same tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.model.generate import greedy_generate, prompt_logits
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.tokenizer import Tokenizer

from .reference import load_reference, reference_greedy, reference_logits

VARIANTS = ["grouped", "no-q-lora", "fp8"]


def _prompts(checkpoint) -> list[list[int]]:
    """Prompts of different lengths: a real chat prompt, a short text, a single token and a long one."""
    tok = Tokenizer.from_dir(checkpoint)
    chat = tok.encode_chat([{"role": "user", "content": "Why is the sky blue? Answer briefly."}])
    return [chat, tok.encode("Hello"), [tok.bos_token_id], list(range(1000, 1070))]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_reference_in_float32(tiny_checkpoints, variant):
    checkpoint = tiny_checkpoints[variant]
    ours = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float32, progress=False)
    ref = load_reference(checkpoint, torch.float32)
    prompts = _prompts(checkpoint)
    for prompt, logits in zip(prompts, prompt_logits(ours, prompts)):  # all prompts in one packed batch
        assert _rel_err(logits, reference_logits(ref, prompt)) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_reference_in_float64(tiny_checkpoints, variant):
    checkpoint = tiny_checkpoints[variant]
    ours = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float64, progress=False)
    ref = load_reference(checkpoint, torch.float64)
    prompts = _prompts(checkpoint)
    generated = greedy_generate(ours, prompts, max_new_tokens=32)
    for prompt, tokens in zip(prompts, generated):
        assert tokens == reference_greedy(ref, prompt, 32)


def test_distributions_are_peaked(tiny_checkpoint):
    """make-tiny's initialisation must leave a clear winner, or greedy comparisons would hinge on ties."""
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float64, progress=False)
    [logits] = prompt_logits(model, [list(range(2000, 2040))])
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert logits.softmax(-1).max(dim=-1).values.mean() > 0.2


def test_bfloat16_is_as_accurate_as_the_reference_in_bfloat16(tiny_checkpoint):
    """Against the float64 reference, our bf16 logits are no worse than transformers' own bf16."""
    prompt = _prompts(tiny_checkpoint)[0]
    exact = reference_logits(load_reference(tiny_checkpoint, torch.float64), prompt)
    theirs = reference_logits(load_reference(tiny_checkpoint, torch.bfloat16), prompt)
    ours = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.bfloat16, progress=False)
    [logits] = prompt_logits(ours, [prompt])
    assert logits.dtype == torch.bfloat16
    assert _rel_err(logits, exact) < 1.25 * _rel_err(theirs, exact)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_reference_with_the_triton_kernels_in_float32(tiny_checkpoints, variant):
    """The fused MoE and paged MLA decode kernels (interpreted on CPU, compiled on CUDA) in float32,
    where their dots are exact float32, give the reference's tokens."""
    checkpoint = tiny_checkpoints[variant]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float32, device, progress=False)
    ours.set_kernels("triton")
    ref = load_reference(checkpoint, torch.float64)
    prompts = _prompts(checkpoint)
    generated = greedy_generate(ours, prompts, max_new_tokens=32)
    for prompt, tokens in zip(prompts, generated):
        assert tokens == reference_greedy(ref, prompt, 32)
