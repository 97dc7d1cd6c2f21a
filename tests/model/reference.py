"""The reference implementation nobody here wrote: transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import torch


def load_reference(checkpoint, dtype: torch.dtype):
    transformers = __import__("transformers")
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(checkpoint),
        dtype=dtype,
        # The eager implementations are the plainest and the only ones that support float64.
        experts_implementation="eager",
        attn_implementation="eager",
    )
    # Its FP8 path dequantizes the quantized projections to `dtype` but leaves the checkpoint's
    # unquantized bf16 tensors as they are; widening them is exact.
    return model.to(dtype).eval()


@torch.inference_mode()
def reference_logits(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] logits of the reference model, one sequence alone."""
    return model(torch.tensor([prompt])).logits[0]


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the reference model with its own KV cache; end-of-sequence is not special."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(max_new_tokens - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens
