"""Fitting a tiny checkpoint's MTP layer to its main model: deterministic, in place without touching the main
model, and enough that the engine keeps most drafts on the fitted prompts (at batch 1, tokens per decode
forward close to the 2 one draft token allows)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from r1serve.cli import main as cli
from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.config import ModelConfig
from r1serve.runtime.model.mtp_fit import fit_mtp, fit_prompts, fitted

pytestmark = pytest.mark.slow

FIT = dict(steps=120, seed=3, sequences=6, new_tokens=24, batch=6)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def fitted_pair(tiny_checkpoint, tmp_path_factory):
    """Two copies of the tiny checkpoint fitted alike, and the weights before."""
    root = tmp_path_factory.mktemp("mtp-fit")
    copies = [root / "a", root / "b"]
    for copy in copies:
        shutil.copytree(tiny_checkpoint, copy)
    before = _tensors(copies[0])
    reports = [fit_mtp(copy, progress=False, **FIT) for copy in copies]
    return copies, reports, before


def test_a_fit_is_deterministic_and_changes_only_the_mtp_layer(fitted_pair, tiny_checkpoint):
    (a, b), (report, again), before = fitted_pair
    assert report == again and report.last_loss < report.first_loss / 10
    after, other = _tensors(a), _tensors(b)
    assert after.keys() == before.keys() and all(torch.equal(after[n], other[n]) for n in after)
    layer = f"model.layers.{ModelConfig.from_file(a).num_hidden_layers}."  # the MTP layer
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(n.startswith(layer) for n in changed)
    assert f"{layer}eh_proj.weight" in changed
    assert fitted(a, FIT["steps"], FIT["seed"]) and not fitted(a, FIT["steps"], FIT["seed"] + 1)
    assert not fitted(tiny_checkpoint, FIT["steps"], FIT["seed"])


def test_the_engine_keeps_most_drafts_of_the_fitted_layer_at_batch_1(fitted_pair):
    (checkpoint, _), (report, _), _ = fitted_pair
    assert report.fitted_agreement > 0.9
    engine = LLMEngine.from_checkpoint(checkpoint, EngineConfig(num_blocks=64, block_size=16, speculative_tokens=1))
    tokens = forwards = 0
    for i, prompt in enumerate(fit_prompts(engine.model.config.vocab_size, seed=FIT["seed"],
                                           sequences=FIT["sequences"])):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=FIT["new_tokens"], temperature=0,
                                                           ignore_eos=True))
        engine.step()  # the prompt, and the first token
        while engine.has_work:
            tokens += sum(len(out.token_ids) for out in engine.step())
            forwards += 1
    assert tokens / forwards >= 1.7


def test_a_layer_whose_embedding_and_head_equal_the_models_reads_the_models_own(fitted_pair, tiny_checkpoint):
    """As in DeepSeek's checkpoints, the fitted layer's embedding and head are copies of the model's: loading
    keeps one of each. The random tiny layer's are its own, and stay."""
    from r1serve.runtime.model.model import DeepseekV3ForCausalLM

    (checkpoint, _), _, _ = fitted_pair
    held = {}
    for directory, shared in ((checkpoint, True), (tiny_checkpoint, False)):
        model = DeepseekV3ForCausalLM.from_checkpoint(directory, torch.float32, progress=False)
        model.load_mtp(directory)
        assert (model.mtp.embed_tokens.weight is model.model.embed_tokens.weight) is shared
        assert (model.mtp.shared_head.head.weight is model.head_weight()) is shared
        held[shared] = sum(p.numel() for p in model.parameters())  # each tensor once
    config = ModelConfig.from_file(checkpoint)
    assert held[False] - held[True] == 2 * config.vocab_size * config.hidden_size


def test_the_command_line_fits_once_and_refuses_an_fp8_checkpoint(fitted_pair, tiny_checkpoints, capsys):
    (checkpoint, _), _, _ = fitted_pair
    assert cli(["checkpoint", "fit-mtp", str(checkpoint), "--steps", str(FIT["steps"]), "--seed",
                str(FIT["seed"]), "--if-needed"]) == 0
    assert "already fitted (120 steps, seed 3)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rewrites dequantized checkpoints only"):
        fit_mtp(tiny_checkpoints["fp8"], steps=1, progress=False)
