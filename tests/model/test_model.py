"""The model's own invariants: both MLA paths agree, batching changes nothing, every dtype runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from r1serve.runtime.model.batch import ForwardBatch, SequenceChunk
from r1serve.runtime.model.generate import greedy_generate, prompt_logits
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.model.moe import LocalExperts, TopKGate
from r1serve.runtime.model.tiny import random_weights, tiny_config

PROMPTS = [list(range(500, 537)), [7, 8, 9], list(range(3000, 3011))]


def _model(dtype=torch.float64, **overrides) -> DeepseekV3ForCausalLM:
    config = tiny_config(overrides)
    model = DeepseekV3ForCausalLM(config, dtype)
    weights = random_weights(config, seed=3)  # bf16 values, as a checkpoint stores them
    for name in model.expected_checkpoint_shapes():
        model.load_tensor(name, weights[name])
    return model.eval()


@pytest.fixture(scope="module")
def model64():
    return _model()


# Routing runs in float32 (as in the reference), so float64 results agree to float32's precision
# wherever the batch's shape changes how the router's matmul is blocked.
ROUTER_PRECISION = 1e-6


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_absorbed_decode_equals_naive_step_by_step(dtype, tolerance):
    model = _model(dtype)
    slots = [list(range(i * 64, i * 64 + 64)) for i in range(len(PROMPTS))]
    caches = model.allocate_kv_cache(64 * len(PROMPTS))
    prefill = ForwardBatch.build([SequenceChunk(p, s[: len(p)]) for p, s in zip(PROMPTS, slots)])
    tokens = [[t] for t in model(prefill, caches).argmax(-1).tolist()]
    for _ in range(8):
        chunks = [SequenceChunk([t[-1]], s[: len(p) + len(t)]) for p, s, t in zip(PROMPTS, slots, tokens)]
        batch = ForwardBatch.build(chunks)
        naive = model(batch, [c.clone() for c in caches], path="naive")
        absorbed = model(batch, caches, path="absorbed")
        assert _rel(absorbed, naive) < tolerance
        for seq, token in zip(tokens, absorbed.argmax(-1).tolist()):
            seq.append(token)


def test_packed_batch_equals_each_sequence_alone(model64):
    together = prompt_logits(model64, PROMPTS)
    for prompt, logits in zip(PROMPTS, together):
        [alone] = prompt_logits(model64, [prompt])
        assert _rel(logits, alone) < ROUTER_PRECISION


def test_chunked_prefill_equals_whole_prompt(model64):
    """A prompt fed in pieces at later positions (what an engine does) gives the same last logits."""
    prompt = PROMPTS[0]
    caches = model64.allocate_kv_cache(len(prompt))
    slots = list(range(len(prompt)))
    for start, end in [(0, 10), (10, 11), (11, len(prompt))]:
        batch = ForwardBatch.build([SequenceChunk(prompt[start:end], slots[:end])])
        logits = model64(batch, caches)
    [whole] = prompt_logits(model64, [prompt])
    assert _rel(logits[0], whole[-1]) < ROUTER_PRECISION


def test_sequences_at_different_stages_share_a_step(model64):
    """A decode token and a prefill chunk in one batch equal the two done separately."""
    generated = greedy_generate(model64, PROMPTS[:2], max_new_tokens=6)
    caches = model64.allocate_kv_cache(256)
    a, b = PROMPTS[0] + generated[0][:5], PROMPTS[1]
    model64(ForwardBatch.build([SequenceChunk(a[:-1], list(range(len(a) - 1)))]), caches)
    mixed = ForwardBatch.build(
        [SequenceChunk(a[-1:], list(range(len(a)))), SequenceChunk(b, list(range(128, 128 + len(b))))]
    )
    next_tokens = model64(mixed, caches).argmax(-1).tolist()
    assert next_tokens == [generated[0][5], generated[1][0]]


@pytest.mark.parametrize("kernels,dtype,tolerance", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)])
def test_short_chunks_attend_as_decode_rows_and_equal_the_prompt_path(kernels, dtype, tolerance):
    """Speculative decoding's verification: a sequence's last token and its draft attend as two decode rows,
    each up to its own position (the absorbed path, the paged kernel), beside a one-token decode and a
    prompt chunk; every row's logits equal those of the prompt path."""
    model = _model(dtype)
    model.set_kernels(kernels)
    slots = [list(range(i * 64, i * 64 + 64)) for i in range(len(PROMPTS))]
    caches = model.allocate_kv_cache(64 * len(PROMPTS))
    model(ForwardBatch.build([SequenceChunk(p, s[: len(p)]) for p, s in zip(PROMPTS[:2], slots)]), caches)
    chunks = [SequenceChunk([11, 12], slots[0][: len(PROMPTS[0]) + 2]),  # a last token and its draft
              SequenceChunk([13], slots[1][: len(PROMPTS[1]) + 1]),  # a plain decode
              SequenceChunk(PROMPTS[2], slots[2][: len(PROMPTS[2])])]  # a prompt
    logits = {}
    for up_to in (1, 2):
        batch = ForwardBatch.build(chunks, decode_up_to=up_to)
        every_row = torch.arange(batch.num_tokens)
        logits[up_to] = model(dataclasses.replace(batch, logits_indices=every_row), [c.clone() for c in caches])
        assert (batch.decode.lengths is not None) == (up_to == 2)
    assert ForwardBatch.build(chunks, decode_up_to=2).decode.lengths.tolist() == [38, 39, 4]
    assert _rel(logits[2], logits[1]) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions_stay_close_to_float64(model64, dtype):
    model = _model(dtype)
    for ours, ref in zip(prompt_logits(model, PROMPTS), prompt_logits(model64, PROMPTS)):
        assert ours.dtype == dtype and torch.isfinite(ours).all()
        # bf16 over a random MoE flips some expert choices: the reference's bf16 is ~5% off as well.
        assert _rel(ours.double(), ref) < (0.15 if dtype == torch.bfloat16 else 1e-5)


def test_grouped_experts_equal_per_token_reference(model64):
    experts = model64.model.layers[1].mlp.experts
    for n in (50, experts.LOOP_THRESHOLD * experts.num_slots + 3):  # the batched and the contiguous path
        x = torch.randn(n, model64.config.hidden_size, dtype=torch.float64)
        slots = torch.randint(0, experts.num_slots, (n,))
        assert _rel(experts(x, slots), experts.forward_naive(x, slots)) < 1e-13
        assert _rel(experts.forward_per_expert(x, slots), experts.forward_naive(x, slots)) < 1e-13


def test_gate_respects_groups_bias_and_scaling():
    config = tiny_config()
    gate = TopKGate(config)
    gate.weight.copy_(torch.randn_like(gate.weight))
    gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts))
    x = torch.randn(64, config.hidden_size)
    weights, ids = gate(x)
    per_group = config.n_routed_experts // config.n_group
    for row_ids in ids:
        assert len({int(i) // per_group for i in row_ids}) <= config.topk_group
    assert torch.allclose(weights.sum(-1), torch.full((64,), config.routed_scaling_factor))
    scores = torch.sigmoid(x @ gate.weight.T)
    chosen = scores.gather(1, ids)
    assert torch.allclose(weights / config.routed_scaling_factor, chosen / chosen.sum(-1, keepdim=True))


def test_expert_subset_holds_only_its_experts():
    config = tiny_config()
    model = DeepseekV3ForCausalLM(config, torch.float32, experts=LocalExperts(config.n_routed_experts, (0, 5, 9)))
    names = model.expected_checkpoint_shapes()
    held = {n.split(".experts.")[1].split(".")[0] for n in names if ".experts." in n}
    assert held == {"0", "5", "9"}
    assert model.model.layers[1].mlp.experts.w13.shape[0] == 3


def test_checkpoint_tensors_round_trip(model64):
    clone = DeepseekV3ForCausalLM(model64.config, torch.float64)
    for name, tensor in model64.checkpoint_tensors():
        clone.load_tensor(name, tensor)
    for (name, a), (_, b) in zip(model64.checkpoint_tensors(), clone.checkpoint_tensors()):
        assert torch.equal(a, b), name


def test_forward_batch_rejects_inconsistent_chunks():
    with pytest.raises(ValueError, match="sequence 0: 3 new tokens with a context of 2"):
        ForwardBatch.build([SequenceChunk([1, 2, 3], [0, 1])])
    with pytest.raises(ValueError, match="at least one sequence"):
        ForwardBatch.build([])
    with pytest.raises(ValueError, match="sequence 0: a context of 9 tokens does not fit its 2 blocks of 4"):
        ForwardBatch.build([SequenceChunk([1], [0, 1], context_len=9)], block_size=4)
    batch = ForwardBatch.build([SequenceChunk([1, 2], [5, 6, 7, 8])])
    assert batch.positions.tolist() == [2, 3] and batch.slot_mapping.tolist() == [7, 8]
    assert batch.decode is None and batch.prefill is not None
    assert not batch.prefill.from_start  # two cached tokens before the new ones: an explicit mask
    fresh = ForwardBatch.build([SequenceChunk([1, 2, 3], [0, 1, 2]), SequenceChunk([4, 5], [3, 4])])
    assert fresh.prefill.from_start  # prompts with nothing cached: plain causal, no mask tensor
    mixed = ForwardBatch.build([SequenceChunk([1], [0, 1, 2]), SequenceChunk([4, 5], [9, 8])])
    assert mixed.decode.rows.tolist() == [0] and mixed.decode.seqs.tolist() == [0]
    assert mixed.prefill.token_rows.tolist() == [1, 2]


def test_forward_batch_addresses_tokens_through_block_tables():
    """Positions and write slots follow each sequence's block table, across block boundaries."""
    batch = ForwardBatch.build(
        [SequenceChunk([1], [3, 0], context_len=6), SequenceChunk([4, 5, 6], [2, 5], context_len=5)], block_size=4
    )
    assert batch.positions.tolist() == [5, 2, 3, 4]
    assert batch.slot_mapping.tolist() == [0 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 5 * 4 + 0]
    assert batch.context_lens.tolist() == [6, 5] and batch.block_tables.tolist() == [[3, 0], [2, 5]]
    decodes = ForwardBatch.build([SequenceChunk([1], [3]), SequenceChunk([2], [4])], block_size=2)
    assert decodes.decode.rows is None and decodes.prefill is None  # the shape a CUDA graph replays


def test_an_empty_batch_runs_through_every_layer(model64):
    """What an idle data-parallel rank runs so that its group's collectives line up."""
    caches = model64.allocate_kv_cache(8)
    logits = model64(ForwardBatch.empty(), caches)
    assert logits.shape == (0, model64.config.vocab_size)
