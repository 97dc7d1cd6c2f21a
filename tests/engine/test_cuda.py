"""The same engine code on CUDA in bf16 (runs where a GPU is present; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.generate import prompt_logits
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.tokenizer import Tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_float32_logits_equal_cpu(tiny_checkpoint):
    prompts = [list(range(100, 130)), [5, 6]]
    cpu = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, progress=False)
    gpu = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, "cuda", progress=False)
    for a, b in zip(prompt_logits(cpu, prompts), prompt_logits(gpu, prompts)):
        assert ((a - b.cpu()).norm() / a.norm()).item() < 1e-4


def test_bf16_engine_on_cuda_with_handoff_and_seeds(tiny_checkpoint):
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.bfloat16, "cuda", progress=False)
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=5, ignore_eos=True)
    both = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=16))
    both.add_request("r", list(range(200, 260)), params)
    combined = []
    while both.has_work:
        combined += [t for o in both.step() for t in o.token_ids]
    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", num_blocks=64, block_size=16))
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=64, block_size=16))
    prefill.add_request("r", list(range(200, 260)), params)
    [out] = [o for _ in range(10) for o in prefill.step()][:1]
    split = [t for o in decode.add_handoff(out.handoff) for t in o.token_ids]
    while decode.has_work:
        split += [t for o in decode.step() for t in o.token_ids]
    assert split == combined and len(combined) == 16
