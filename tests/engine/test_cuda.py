"""The same engine code on CUDA in bf16 (runs where a GPU is present; skipped elsewhere)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.model_runner import RunnerPaths
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


def _greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 20) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    return [outputs[f"r{i}"] for i in range(len(prompts))]


# Batches of 1 to 7 sequences that finish at different steps, so decode batches shrink across buckets.
GRAPH_PROMPTS = [list(range(300 + 11 * i, 300 + 11 * i + n)) for i, n in enumerate([3, 70, 17, 1, 33, 9, 50])]


def test_auto_runs_the_triton_kernels_and_cuda_graphs_on_cuda(tiny_checkpoint):
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.bfloat16, "cuda", progress=False)
    engine = LLMEngine(model, Tokenizer.from_dir(tiny_checkpoint), EngineConfig(num_blocks=64, block_size=16,
                                                                                max_running=8, max_model_len=256))
    description = engine.describe()
    assert description["kernels"] == "triton" and description["device"].startswith("cuda")
    graphs = engine.runner.graphs
    assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8] and graphs.memory_bytes >= 0
    assert "graphs" in description["cudaGraphs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_gives_the_eager_tokens(tiny_checkpoint, dtype):
    """Kernels + graphs against the same kernels run eagerly over the static buffers (same arithmetic:
    identical tokens in both dtypes), and in float32 against unpadded eager steps and the torch path."""
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, dtype, "cuda", progress=False)
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    config = EngineConfig(num_blocks=96, block_size=16, max_running=8, max_batch_tokens=128, max_model_len=256)

    def run(paths):
        return _greedy_tokens(LLMEngine(model, tokenizer, config, paths=paths), GRAPH_PROMPTS)

    graphs = run(RunnerPaths(kernels="triton", cuda_graphs=True))
    assert graphs == run(RunnerPaths(kernels="triton", static_decode=True))  # the same arithmetic, replayed
    if dtype == torch.float32:  # unpadded eager batches split attention differently: equal to rounding
        assert graphs == run(RunnerPaths(kernels="triton"))
        assert graphs == run(RunnerPaths(kernels="torch"))


def test_verification_replayed_from_graphs_gives_the_eager_tokens_and_speculation_changes_none(tiny_checkpoint):
    """With MTP drafts, steps of verify rows replay graphs captured for two rows per sequence: the same tokens
    as the static buffers run eagerly, and (float32) as the plain run without speculation."""
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, "cuda", progress=False)
    model.load_mtp(tiny_checkpoint)
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    config = EngineConfig(num_blocks=96, block_size=16, max_running=8, max_batch_tokens=128, max_model_len=256)
    drafting = replace(config, speculative_tokens=1)
    engine = LLMEngine(model, tokenizer, drafting, paths=RunnerPaths(kernels="triton", cuda_graphs=True))
    assert engine.runner.graphs.buckets[-1] == 16 and sorted(engine.runner.graphs.graphs) == [1, 2, 4, 8, 16]
    replayed = _greedy_tokens(engine, GRAPH_PROMPTS)
    eager = LLMEngine(model, tokenizer, drafting, paths=RunnerPaths(kernels="triton", static_decode=True))
    assert replayed == _greedy_tokens(eager, GRAPH_PROMPTS)
    assert replayed == _greedy_tokens(LLMEngine(model, tokenizer, config,
                                                paths=RunnerPaths(kernels="triton", cuda_graphs=True)), GRAPH_PROMPTS)


def test_a_rebalance_in_place_keeps_captured_graphs_valid(tiny_checkpoint):
    """Expert slots are overwritten in place, so a graph captured before a rebalance computes with the
    new experts: swapping two experts' slots (and their weights) changes nothing in the tokens."""
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float32, "cuda", progress=False)
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    config = EngineConfig(num_blocks=64, block_size=16, max_running=4, max_model_len=256)
    engine = LLMEngine(model, tokenizer, config, paths=RunnerPaths(kernels="triton", cuda_graphs=True))
    before = _greedy_tokens(engine, GRAPH_PROMPTS[:4])
    layer = model.moe_layers()[0]
    weights = {name: tensor.clone() for name, tensor in model.checkpoint_tensors()}
    ids = list(layer.experts.expert_ids)
    ids[0], ids[1] = ids[1], ids[0]
    moe_index = next(i for i, decoder in enumerate(model.model.layers) if decoder.mlp is layer)
    w13 = layer.experts.w13.data_ptr()
    model.replace_experts(moe_index, ids)
    for name, tensor in weights.items():
        if f"layers.{moe_index}.mlp.experts." in name:
            model.load_tensor(name, tensor)
    assert layer.experts.w13.data_ptr() == w13
    assert _greedy_tokens(engine, GRAPH_PROMPTS[:4]) == before


def test_overlapped_decode_steps_never_wait_for_the_device(tiny_checkpoint, monkeypatch):
    """Launching a decode step from the previous step's device tokens (batch, graph replay, sampling,
    the token copy) must not synchronise, or the GPU idles while the host prepares: checked with
    PyTorch's sync debug mode, with greedy and sampled requests in the batch."""
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.bfloat16, "cuda", progress=False)
    config = EngineConfig(num_blocks=96, block_size=16, max_running=8, max_model_len=256, overlap=True)
    engine = LLMEngine(model, Tokenizer.from_dir(tiny_checkpoint), config,
                       paths=RunnerPaths(kernels="triton", cuda_graphs=True))
    launch, checked = engine._launch, []

    def strict(chunks, input_ids=None):
        if input_ids is None:
            return launch(chunks, input_ids)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(chunks, input_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(len(chunks))

    monkeypatch.setattr(engine, "_launch", strict)
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)]
    for i, prompt in enumerate(GRAPH_PROMPTS):
        engine.add_request(f"r{i}", prompt, params[i % 2])
    counts: dict[str, int] = {}
    while engine.has_work:
        for out in engine.step():
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.token_ids)
    assert len(checked) > 5 and all(n == 20 for n in counts.values()) and len(counts) == len(GRAPH_PROMPTS)
