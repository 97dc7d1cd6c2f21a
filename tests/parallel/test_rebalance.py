"""Rebalancing while the group serves (gloo on CPU): incoming experts load off the step loop and every rank
switches at one step boundary, outputs never change; an empty load window changes nothing; and
experts.rebalanceIntervalSeconds drives it on its own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine
from r1serve.runtime.engine.sampling import SamplingParams
from r1serve.runtime.model.config import ModelConfig
from r1serve.runtime.parallel.group import ExpertParallelGroup
from r1serve.runtime.parallel.placement import balanced_placement
from r1serve.runtime.serve.kept_load import keep_locally, read_kept_load

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(num_blocks=96, block_size=8, max_batch_tokens=64)
PROMPT = list(range(200, 230))
LONG = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
LOAD_DELAY_S = 2.0


def _reference(checkpoint) -> list[int]:
    engine = LLMEngine.from_checkpoint(checkpoint, ENGINE, dtype=torch.float32)
    engine.add_request("ref", PROMPT, LONG)
    tokens = []
    while engine.has_work:
        for out in engine.step():
            tokens += out.token_ids
    return tokens


def test_steps_go_on_while_incoming_experts_load_and_the_output_does_not_change(tiny_checkpoint):
    expected = _reference(tiny_checkpoint)
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE, redundant=2,
                                             options={"expert_load_delay_s": LOAD_DELAY_S})
    try:
        asyncio.run(_drain(group, "warm", PROMPT[:12]))  # load to rebalance from
        before = group.placements()
        arrivals: list[float] = []
        finished = threading.Event()
        window: dict[str, float] = {}

        def rebalance():
            window["start"] = time.monotonic()
            window["changed"] = group.rebalance()
            window["end"] = time.monotonic()
            finished.set()

        async def stream():
            tokens = []
            async for out in group.generate("long", PROMPT, LONG):
                tokens += out.token_ids
                arrivals.append(time.monotonic())
                if len(tokens) == 5:
                    threading.Thread(target=rebalance, daemon=True).start()
            return tokens

        tokens = asyncio.run(stream())
        assert finished.wait(60)
        assert window["changed"] and group.placements() != before
        assert window["end"] - window["start"] >= LOAD_DELAY_S
        during = [t for t in arrivals if window["start"] < t < window["end"]]
        assert len(during) >= 10, f"only {len(during)} tokens while the experts loaded"
        assert tokens == expected  # the switch in the middle of the stream changes no token
    finally:
        group.shutdown()


async def _drain(group, request_id, prompt, params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
    return [t async for out in group.generate(request_id, prompt, params) for t in out.token_ids]


def test_an_empty_load_window_keeps_the_placement(tiny_checkpoint):
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE)
    try:
        before = group.placements()
        assert not group.rebalance() and group.placements() == before
    finally:
        group.shutdown()


def test_the_interval_rebalances_on_its_own(tiny_checkpoint):
    group = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE, redundant=2,
                                             rebalance_interval_s=0.5)
    try:
        before = group.placements()
        first = asyncio.run(_drain(group, "a", PROMPT))
        deadline = time.monotonic() + 60
        while group.placements() == before:
            assert time.monotonic() < deadline, "no scheduled rebalance within 60 s"
            time.sleep(0.2)
        assert asyncio.run(_drain(group, "b", PROMPT)) == first
    finally:
        group.shutdown()


def test_a_restarted_group_starts_from_the_load_its_predecessor_kept(tiny_checkpoint, tmp_path):
    """The load one group saw, kept in its file, places a later group's experts from its first step (balanced,
    not uniform); outputs do not change."""
    config = ModelConfig.from_file(tiny_checkpoint)
    first = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE, redundant=2)
    try:
        before = asyncio.run(_drain(first, "a", PROMPT, SamplingParams(max_tokens=48, temperature=0,
                                                                       ignore_eos=True)))
        uniform = first.placements()[0]
        path = tmp_path / "expert-load" / "tiny" / "decode.json"
        keep_locally(path, first.expert_load())
    finally:
        first.shutdown()
    kept = read_kept_load(path, num_experts=config.n_routed_experts, layers=config.moe_layers)
    assert kept is not None and set(kept) == set(config.moe_layers)
    second = ExpertParallelGroup.in_processes(str(tiny_checkpoint), 2, engine=ENGINE, redundant=2, expert_load=kept)
    try:
        placements = second.placements()[0]
        assert placements != uniform
        assert placements == {layer: balanced_placement(kept[layer], 2, 2).physical_to_logical
                              for layer in config.moe_layers}
        assert asyncio.run(_drain(second, "b", PROMPT, SamplingParams(max_tokens=48, temperature=0,
                                                                      ignore_eos=True))) == before
    finally:
        second.shutdown()
