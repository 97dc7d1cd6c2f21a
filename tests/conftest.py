"""Shared fixtures: tiny checkpoints written once per session in the published layout."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the Triton kernels are tested through Triton's interpreter. Triton reads the switch when a
# kernel is decorated, i.e. when the kernel module is first imported, so it is set here, before r1serve's
# modules and any test module are imported; with CUDA the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from r1serve.runtime.model.checkpoint_writer import copy_tokenizer
from r1serve.runtime.model.tiny import make_tiny

# Three architectures the parity tests cover: grouped routing with low-rank queries and YaRN (the
# default), full-rank queries with ungrouped routing and plain rope, and an FP8 checkpoint whose
# hidden size spans a full and a partial 128x128 block.
TINY_VARIANTS = {
    "grouped": {},
    "no-q-lora": {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "rope_scaling": None, "rope_interleave": False},
    "fp8": {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128},
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: make_tiny(root / name, seed=7, fp8=(name == "fp8"), overrides=overrides)
        for name, overrides in TINY_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    return tiny_checkpoints["grouped"]


@pytest.fixture(scope="session")
def reliability():
    """`record(name, kind, what=..., requests=..., failed=..., ...)`: figures for docs/RELIABILITY.md
    (scripts/reliability_report.py renders them)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reliability_report.py"
    spec = importlib.util.spec_from_file_location("reliability_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.record


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A checkpoint-like directory holding only the hub's tokenizer files (no weights)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    copy_tokenizer(directory)
    return directory
