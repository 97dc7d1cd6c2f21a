"""Speculative decoding with the checkpoint's MTP module: greedy output is the same as without it, token for
token, whether the drafts are kept or refused; sampled requests stay reproducible with a seed."""

from __future__ import annotations

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.model_runner import RunnerPaths
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
from r1serve.runtime.model.mtp import MultiTokenPredictor
from r1serve.runtime.model.tiny import make_tiny

from .workload import GREEDY, drain, prompts, tokens

MTP = EngineConfig(num_blocks=30, block_size=8, max_batch_tokens=48, max_running=6, speculative_tokens=1)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float64, progress=False)
    model.load_mtp(tiny_checkpoint)
    return model


@pytest.fixture(scope="module")
def plain(model, tokenizer):
    """Every workload prompt's greedy tokens without speculation (a cache that preempts, shared prefixes)."""
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=30, block_size=8, max_batch_tokens=48, max_running=6))
    outputs = {}
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    drain(engine, outputs)
    return {rid: tokens(outs) for rid, outs in outputs.items()}


def _run(engine: LLMEngine, params: SamplingParams = GREEDY) -> tuple[dict, int]:
    outputs, steps = {}, 0
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, params)
    while engine.has_work:
        steps += 1
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return {rid: tokens(outs) for rid, outs in outputs.items()}, steps


def test_greedy_with_mtp_drafts_equals_greedy_without(model, tokenizer, plain):
    """The tiny checkpoint's MTP layer is random: nearly every draft is refused, and nothing changes."""
    engine = LLMEngine(model, tokenizer, MTP)
    got, _ = _run(engine)
    assert got == plain
    stats = engine.stats()
    assert stats.draft_tokens > 0 and stats.preemptions > 0 and stats.prefix_hit_tokens > 0
    assert stats.kv_blocks_used == 0 and not engine.drafts


def test_drafts_the_main_model_agrees_with_are_kept_and_change_nothing(model, tokenizer, plain):
    """Drafts from an oracle that knows the plain run's tokens, right two times in three: those are kept (a
    step then emits two tokens), the others refused, and the output is the plain run's."""
    engine = LLMEngine(model, tokenizer, MTP)
    draft = engine._draft
    counter = iter(range(10**6))

    def oracle(entries, hidden, lockstep):
        draft(entries, hidden, lockstep)
        for rid, (drafted, q, at) in list(engine.drafts.items()):
            seq = engine.requests[rid].seq
            want = plain[rid]
            if seq.num_output_tokens < len(want):
                right = want[seq.num_output_tokens]
                engine.drafts[rid] = ([right if next(counter) % 3 else (right + 1) % 1000], q, at)

    engine._draft = oracle
    got, steps = _run(engine)
    assert got == plain
    stats = engine.stats()
    assert 0.5 * stats.draft_tokens < stats.accepted_draft_tokens < stats.draft_tokens
    _, plain_steps = _run(LLMEngine(model, tokenizer, MTP))
    assert steps < plain_steps  # kept drafts are tokens without a step of their own
    assert stats.kv_blocks_used == 0


def test_verification_replays_the_decode_graphs_and_changes_nothing(model, tokenizer, plain):
    """With decode graphs (their static buffers, run eagerly on CPU), a sequence's last token and its draft run
    as two rows of a replayed step, and greedy output is the plain run's."""
    engine = LLMEngine(model, tokenizer, MTP, paths=RunnerPaths(static_decode=True))
    runner, graphs = engine.runner, engine.runner.graphs
    shapes, replays = [], []
    token_rows, replay = runner._token_rows, graphs.run_with_hidden
    runner._token_rows = lambda chunks, ids: shapes.append([c.num_tokens for c in chunks]) or token_rows(chunks, ids)
    graphs.run_with_hidden = lambda batch: replays.append(batch.num_tokens) or replay(batch)
    got, _ = _run(engine)
    assert got == plain
    assert any(2 in shape for shape in shapes)  # drafts verified in replayed steps
    assert replays == [sum(shape) for shape in shapes]  # every such step fits the graphs' buckets


def test_a_stop_within_the_tokens_kept_ends_the_request_there(model, tokenizer, plain):
    engine = LLMEngine(model, tokenizer, MTP)
    draft = engine._draft

    def oracle(entries, hidden, lockstep):  # always right: each step keeps its draft and one token more
        draft(entries, hidden, lockstep)
        for rid in list(engine.drafts):
            seq = engine.requests[rid].seq
            if seq.num_output_tokens < len(plain["r1"]):
                engine.drafts[rid] = ([plain["r1"][seq.num_output_tokens]], None, seq.num_tokens)

    engine._draft = oracle
    # Each step keeps a draft and one token more: outputs 1-2, 3-4, 5-6... arrive together. A stop at 5 comes
    # with a token after it.
    stop = plain["r1"][5]
    first = plain["r1"].index(stop)
    assert first == 5
    engine.add_request("r1", prompts()[1], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))
    outputs = {}
    drain(engine, outputs)
    assert tokens(outputs["r1"]) == plain["r1"][: first + 1]
    assert outputs["r1"][-1].finish_reason == "stop"
    assert outputs["r1"][-1].completion_tokens == first + 1  # the token kept after the stop is not counted


def test_tokens_kept_before_the_mtp_layers_collective_broke_go_out_with_the_next_step(model, tokenizer, plain):
    """In an expert-parallel group a lost rank may break the MTP layer's all-to-all after the model's forward
    kept a step's tokens: the step raises (the group forms again), and the next step sends those tokens first.
    Nothing is lost or repeated, the output is the plain run's, and requests that finished in a broken step are
    retired."""
    engine = LLMEngine(model, tokenizer, MTP)
    run_mtp, calls = engine.runner.run_mtp, iter(range(10**6))

    def breaking(*args):
        if next(calls) % 5 == 3:
            raise RuntimeError("Connection reset by peer")
        return run_mtp(*args)

    engine.runner.run_mtp = breaking
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    outputs, broke = {}, 0
    while engine.has_work:
        try:
            step = engine.step(lockstep=True)
        except RuntimeError:
            broke += 1
            continue
        for out in step:
            outputs.setdefault(out.request_id, []).append(out)
    assert broke > 5
    assert {rid: tokens(outs) for rid, outs in outputs.items()} == plain
    assert all([o.finished for o in outs] == [False] * (len(outs) - 1) + [True] for outs in outputs.values())
    assert engine.stats().kv_blocks_used == 0 and not engine.requests


def test_a_request_that_finished_in_a_step_whose_mtp_forward_broke_still_gets_its_end(model, tokenizer):
    """When the engine gives up after such a step (one process: the model raised), the outputs the step had kept
    go out before every other request's error: no stream is left waiting."""
    engine = LLMEngine(model, tokenizer, MTP)

    def broken(*args):
        raise RuntimeError("the MTP layer failed")

    engine.runner.run_mtp = broken
    engine.add_request("one", prompts()[0], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    engine.add_request("more", prompts()[2], GREEDY)
    with pytest.raises(RuntimeError, match="the MTP layer failed"):
        engine.step()
    ends = {out.request_id: out for out in engine.fail_all("engine failure")}
    assert (ends["one"].finish_reason, len(ends["one"].token_ids)) == ("length", 1)
    assert (ends["more"].finish_reason, ends["more"].error) == ("error", "engine failure")
    assert engine.stats().kv_blocks_used == 0 and not engine.requests


def test_seeded_sampling_with_mtp_repeats_itself(model, tokenizer):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    runs = [_run(LLMEngine(model, tokenizer, MTP), params)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(len(t) == 12 for t in runs[0].values())


def test_speculation_is_refused_where_it_cannot_run(model, tokenizer, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="speculative_tokens: must be 0 .off. or 1"):
        EngineConfig(speculative_tokens=2)
    bare = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, torch.float64, progress=False)
    with pytest.raises(ValueError, match="the model has no MTP module loaded"):
        LLMEngine(bare, tokenizer, MTP)
    without = make_tiny(tmp_path / "no-mtp", seed=7, overrides={"num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="num_nextn_predict_layers is 0"):
        LLMEngine.from_checkpoint(without, MTP)


def test_the_mtp_module_refuses_a_checkpoint_that_lacks_one_of_its_tensors(tiny_checkpoint, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    layer = json.loads((broken / "config.json").read_text())["num_hidden_layers"]
    del index["weight_map"][f"model.layers.{layer}.eh_proj.weight"]
    index_path.write_text(json.dumps(index))
    config = DeepseekV3ForCausalLM.from_checkpoint(tiny_checkpoint, progress=False).config
    with pytest.raises(ValueError, match=f"needs model.layers.{layer}.eh_proj.weight, which the checkpoint"):
        MultiTokenPredictor.from_checkpoint(broken, config, torch.float32, "cpu")


def _oracle(engine: LLMEngine, plain: dict) -> None:
    """Replace the engine's MTP drafts with the plain run's next tokens (always right)."""
    draft = engine._draft

    def oracle(entries, hidden, lockstep):
        draft(entries, hidden, lockstep)
        for rid in list(engine.drafts):
            seq = engine.requests[rid].seq
            if seq.num_output_tokens < len(plain[rid]):
                engine.drafts[rid] = ([plain[rid][seq.num_output_tokens]], None, seq.num_tokens)

    engine._draft = oracle


def test_prefill_hands_off_the_mtp_cache_and_draft_and_decode_equals_the_plain_run(model, tokenizer, plain):
    """The prefill engine runs the MTP module over the prompt and hands its cache (one layer more) and a
    greedy request's first draft to the decode engine, which keeps drafting from there."""
    config = dict(num_blocks=64, block_size=8, speculative_tokens=1)
    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", **config))
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", **config))
    _oracle(prefill, plain)
    _oracle(decode, plain)
    handoffs, split = {}, {}
    for i, p in enumerate(prompts()[:6]):
        prefill.add_request(f"r{i}", p, GREEDY)
    drain(prefill, handoffs)
    for rid, [out] in handoffs.items():
        layers = model.config.num_hidden_layers + 1
        assert out.handoff.latents.shape[0] == layers and out.handoff.draft_token_ids == (plain[rid][1],)
        for o in decode.add_handoff(out.handoff):
            split.setdefault(rid, []).append(o)
    first_step = decode.step()
    assert decode.stats().accepted_draft_tokens == 6  # every request's handed-off draft, kept at once
    for o in first_step:
        split[o.request_id].append(o)
    drain(decode, split)
    assert {rid: tokens(outs) for rid, outs in split.items()} == {f"r{i}": plain[f"r{i}"] for i in range(6)}
    assert prefill.stats().kv_blocks_used == decode.stats().kv_blocks_used == 0


def test_a_seeded_sampled_request_gives_the_same_tokens_split_over_prefill_and_decode(model, tokenizer):
    """The prefill engine hands a sampled request's MTP hidden state off instead of drawing its draft: the decode
    engine draws it with the request's generator right after the first token, as one engine does, so a seeded
    request gives the same tokens in both topologies."""
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    config = dict(num_blocks=64, block_size=8, speculative_tokens=1)
    single = LLMEngine(model, tokenizer, EngineConfig(**config))
    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", **config))
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", **config))
    handoffs, whole, split = {}, {}, {}
    for i, p in enumerate(prompts()[:4]):
        single.add_request(f"r{i}", p, params)
        prefill.add_request(f"r{i}", p, params)
    drain(single, whole)
    drain(prefill, handoffs)
    for rid, [out] in handoffs.items():
        assert out.handoff.draft_token_ids == () and out.handoff.draft_hidden.shape == (model.config.hidden_size,)
        split[rid] = decode.add_handoff(out.handoff)
    drain(decode, split)
    assert {rid: tokens(outs) for rid, outs in split.items()} == {rid: tokens(outs) for rid, outs in whole.items()}
    assert decode.stats().draft_tokens > 0 and decode.stats().kv_blocks_used == 0


def test_a_hand_off_between_pools_that_disagree_on_speculation_is_refused(model, tokenizer):
    from r1serve.runtime.engine.outputs import RequestError

    prefill = LLMEngine(model, tokenizer, EngineConfig(role="prefill", num_blocks=64, block_size=8,
                                                       speculative_tokens=1))
    decode = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=64, block_size=8))
    prefill.add_request("r", prompts()[0], GREEDY)
    handoffs = {}
    drain(prefill, handoffs)
    with pytest.raises(RequestError, match="one pool drafts with the MTP layer and the other does not"):
        decode.add_handoff(handoffs["r"][0].handoff)
    drafting = LLMEngine(model, tokenizer, EngineConfig(role="decode", num_blocks=64, block_size=8,
                                                        speculative_tokens=1))
    handoffs["r"][0].handoff.draft_token_ids = (10**9,)
    with pytest.raises(RequestError, match=r"handoff.draft_token_ids.*each id must be an integer in \[0, 129280\)"):
        drafting.add_handoff(handoffs["r"][0].handoff)
    handoffs["r"][0].handoff.draft_token_ids, handoffs["r"][0].handoff.draft_hidden = (), torch.zeros(3)
    with pytest.raises(RequestError, match=rf"handoff.draft_hidden: expected a float tensor of shape "
                                           rf"\({model.config.hidden_size},\), got torch.float32 \(3,\)"):
        drafting.add_handoff(handoffs["r"][0].handoff)
    assert drafting.stats().kv_blocks_used == 0 and not drafting.requests
