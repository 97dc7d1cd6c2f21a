"""The engine tests' models (float64 for exact comparisons, float32 for the kernel paths) and tokenizer."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.tokenizer import Tokenizer

from ..model.reference import load_reference, reference_greedy
from .workload import GREEDY, prompts


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float64, progress=False)


@pytest.fixture(scope="module")
def model32(tiny_checkpoint):
    return DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_dir(tiny_checkpoint)


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """The reference model's greedy tokens for each of the workload's prompts, run alone."""
    ref = load_reference(tiny_checkpoint, torch.float64)
    return [reference_greedy(ref, p, GREEDY.max_tokens) for p in prompts()]
