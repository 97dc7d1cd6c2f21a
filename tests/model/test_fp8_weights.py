"""An FP8 checkpoint loaded with weights: fp8 keeps its projections as stored (e4m3 and block multipliers) and
runs them through the block-scaled FP8 linear layer; weights: dequantized is the token-exact format.

What FP8 mode costs in accuracy, on the tiny random FP8 checkpoint (its random weights amplify any rounding:
rounding only the projections' activations to bf16 already moves its logits by about 4%):
- logits relative error against the dequantized model at most 0.25 (measured 0.18);
- next-token agreement (argmax at every prompt position) at least 0.65 (measured 0.74).
Both come from quantizing activations to e4m3 alone: with that step bypassed, the FP8 layers give the
dequantized model's logits exactly, so they hold exactly the checkpoint's values.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import r1serve.runtime.model.fp8_linear as fp8_linear_module
import r1serve.runtime.model.fp8_moe as fp8_moe_module
from r1serve.runtime.model.checkpoint import read_index
from r1serve.runtime.model.fp8 import dequantize_blockwise
from r1serve.runtime.model.fp8_linear import Fp8Linear
from r1serve.runtime.model.generate import prompt_logits
from r1serve.runtime.model.model import DeepseekV3ForCausalLM

LOGITS_BOUND = 0.25
AGREEMENT_BOUND = 0.65


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    checkpoint = tiny_checkpoints["fp8"]
    return (DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float32, progress=False),
            DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float32, progress=False, weights="fp8"))


@pytest.fixture(scope="module")
def prompts(models):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, models[0].config.vocab_size, (48,), generator=generator).tolist() for _ in range(16)]


def test_fp8_mode_keeps_the_checkpoints_projections_as_stored(models, tiny_checkpoints):
    dequantized, fp8 = models
    assert (dequantized.weight_format, fp8.weight_format) == ("dequantized", "fp8")
    attention = fp8.model.layers[1].self_attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert isinstance(getattr(attention, name), Fp8Linear), name
    assert not isinstance(attention.kv_b_proj, Fp8Linear)  # split per head by the absorbed decode path
    assert isinstance(fp8.model.layers[0].mlp.down_proj, Fp8Linear)  # the dense MLP
    assert isinstance(fp8.model.layers[1].mlp.shared_experts.up_proj, Fp8Linear)
    assert not isinstance(fp8.lm_head, Fp8Linear)
    # The very bytes the checkpoint stores, with their multipliers.
    name = "model.layers.1.self_attn.o_proj.weight"
    index = read_index(tiny_checkpoints["fp8"])
    with safe_open(str(index.directory / index.weight_map[name]), framework="pt") as f:
        assert torch.equal(attention.o_proj.weight.view(torch.uint8), f.get_tensor(name).view(torch.uint8))
    # A quarter of the float32 bytes (an eighth of a multiplier per 128x128 block on top).
    kept = [m for m in fp8.modules() if isinstance(m, Fp8Linear)]
    fp8_bytes = sum(m.weight.numel() + 4 * m.weight_scale_inv.numel() for m in kept)
    assert fp8_bytes <= 0.26 * sum(4 * m.weight.numel() for m in kept)


def test_fp8_mode_against_the_dequantized_model_stays_within_its_stated_bounds(models, prompts):
    dequantized, fp8 = models
    want = torch.cat(prompt_logits(dequantized, prompts))
    got = torch.cat(prompt_logits(fp8, prompts))
    error = float((got - want).norm() / want.norm())
    agreement = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert error <= LOGITS_BOUND, error
    assert agreement >= AGREEMENT_BOUND, agreement
    assert error > 0  # the activations were quantized: not the dequantized path under another name


def test_the_fp8_layers_hold_exactly_the_checkpoints_values(models, prompts, monkeypatch):
    dequantized, fp8 = models
    monkeypatch.setattr(fp8_linear_module, "fp8_linear", lambda x, w, scales, kernels="torch": (
        x @ dequantize_blockwise(w, scales, torch.float32).T).to(x.dtype))
    monkeypatch.setattr(fp8_moe_module, "_dequantized", lambda x: x.to(torch.float32))
    # The same values; only the order of float32 sums differs (the experts' matmuls are grouped otherwise).
    got, want = torch.cat(prompt_logits(fp8, prompts[:4])), torch.cat(prompt_logits(dequantized, prompts[:4]))
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_the_weight_format_is_checked_against_the_checkpoint_and_the_device(tiny_checkpoints, tiny_checkpoint):
    with pytest.raises(ValueError, match="weights: fp8 needs a checkpoint with FP8 weights"):
        DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, progress=False, weights="fp8")
    with pytest.raises(ValueError, match=r"weights: must be one of auto, fp8, dequantized \(got 'int4'\)"):
        DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoints["fp8"], progress=False, weights="int4")
    # auto keeps FP8 only on GPUs with FP8 tensor cores: on the CPU the checkpoint is dequantized.
    auto = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoints["fp8"], progress=False, weights="auto")
    assert auto.weight_format == "dequantized"
    assert not any(isinstance(m, Fp8Linear) for m in auto.modules())


def test_an_engine_serves_fp8_weights_and_says_so(tiny_checkpoints):
    from r1serve.runtime.engine.description import format_engine
    from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
    from r1serve.runtime.engine.sampling import SamplingParams

    engine = LLMEngine.from_checkpoint(tiny_checkpoints["fp8"], EngineConfig(num_blocks=32, block_size=16),
                                       weights="fp8")
    assert engine.describe()["weights"] == "fp8"
    assert format_engine(engine.describe()).endswith("CUDA graphs off, weights fp8")
    engine.add_request("r", list(range(100, 130)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    tokens = []
    while engine.has_work:
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert len(tokens) == 8


def test_fp8_experts_move_between_slots_with_their_multipliers(tiny_checkpoints, prompts):
    """What rebalancing (stage, then install in place) and a re-formed expert-parallel group (regrow, with
    some experts read ahead) do to a layer's experts, on an FP8 model: the logits stay those of the start."""
    checkpoint = tiny_checkpoints["fp8"]
    model = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.float32, progress=False, weights="fp8")
    before = torch.cat(prompt_logits(model, prompts[:2]))
    n = model.config.n_routed_experts
    swapped = {layer: tuple(reversed(range(n))) for layer in model.config.moe_layers}
    staged = model.stage_experts(checkpoint, swapped)
    for layer, expert_ids in swapped.items():
        model.install_experts(layer, expert_ids, *staged[layer])
    grown = {layer: (*range(n), 3) for layer in model.config.moe_layers}  # one more slot: a copy of expert 3
    read = model.read_experts(checkpoint, {(layer, 3) for layer in grown})
    model.regrow_experts(checkpoint, grown, staged=read)
    experts = model.moe_layers()[0].experts
    assert experts.fp8 and experts.w13_scale_inv.shape[0] == experts.w13.shape[0] == n + 1
    after = torch.cat(prompt_logits(model, prompts[:2]))
    assert float((after - before).norm() / before.norm()) < 1e-6


@pytest.mark.parametrize("capability, auto", [((8, 0), "dequantized"), ((8, 9), "fp8"), ((9, 0), "fp8")])
def test_gpus_without_fp8_tensor_cores_do_not_get_fp8_weights(monkeypatch, capability, auto):
    from r1serve.runtime.model.fp8 import resolve_weight_format

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_weight_format("auto", True, "cuda") == auto
    assert resolve_weight_format("auto", False, "cuda") == "dequantized"
    if auto == "fp8":
        assert resolve_weight_format("fp8", True, "cuda") == "fp8"
    else:
        with pytest.raises(ValueError, match=r"weights: fp8 needs FP8 tensor cores .* this GPU has 8\.0"):
            resolve_weight_format("fp8", True, "cuda")
