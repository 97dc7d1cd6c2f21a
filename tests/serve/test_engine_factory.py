"""The engine a pool replica gets: exactly what its section of the resource asks for, or an error."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from r1serve.runtime.serve.app import deployment_options
from r1serve.runtime.serve.engine_factory import EngineSource, make_engine_client
from r1serve.runtime.serve.pool_plan import plan_pools
from r1serve.spec import load_r1deployment, parse_r1deployment

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


def _plans(deployment):
    return plan_pools(deployment, deployment_options(deployment))


@pytest.mark.parametrize("pool", ["decode", "prefill"])
def test_a_pool_asking_for_ranks_never_silently_runs_in_one_process(monkeypatch, tmp_path, pool):
    deployment = load_r1deployment(TINY)
    plan = _plans(deployment)[pool]
    assert plan.expert_parallel == 2
    monkeypatch.setitem(sys.modules, "r1serve.runtime.parallel.group", None)  # cannot be imported
    with pytest.raises(RuntimeError, match=rf"spec\.{pool}\.expertParallel: 2 rank\(s\) with 0 GPU\(s\) each "
                                           "need the expert-parallel runtime, which cannot be imported here"):
        make_engine_client(plan, tmp_path)


def test_a_gpu_pool_of_one_rank_runs_its_engine_in_the_rank_that_holds_the_gpu(monkeypatch, tmp_path):
    # The replica actor reserves no GPU: an engine built in it would land on the CPU without a word.
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["decode"].update(expertParallel=1, gpusPerRank=1)
    doc["spec"]["prefill"].update(gpusPerRank=1)
    doc["spec"]["model"]["weights"] = "fp8"
    plan = _plans(parse_r1deployment(doc))["decode"]
    assert plan.rank_bundles[0]["GPU"] == 1.0 and plan.weights == "fp8"
    monkeypatch.setitem(sys.modules, "r1serve.runtime.parallel.group", None)
    with pytest.raises(RuntimeError, match=r"spec\.decode\.expertParallel: 1 rank\(s\) with 1 GPU\(s\) each"):
        make_engine_client(plan, tmp_path)


def test_each_pool_plan_follows_its_own_section_and_the_engine_roles_follow_disaggregation():
    doc = yaml.safe_load(TINY.read_text())
    plans = _plans(parse_r1deployment(doc))
    assert {p: (plan.engine_role, plan.deployment, plan.engine.max_batch_tokens) for p, plan in plans.items()} == {
        "prefill": ("prefill", "PrefillServer", 1024), "decode": ("decode", "DecodeServer", 512)}
    assert {plan.weights for plan in plans.values()} == {"dequantized"}  # model.weights' default
    # The rank bundles are the ones the Serve config reserves for the pool, rank by rank.
    options = deployment_options(parse_r1deployment(doc))
    assert list(plans["decode"].rank_bundles) == options["DecodeServer"]["placement_group_bundles"][1:]

    alone = copy.deepcopy(doc)
    alone["spec"]["disaggregation"] = False
    del alone["spec"]["prefill"]
    plans = _plans(parse_r1deployment(alone))
    assert list(plans) == ["decode"] and plans["decode"].engine_role == "both"


@pytest.mark.parametrize("args,message", [
    ({"kind": "fake"}, r"args\.engine\.kind: must be model or mock \(got 'fake'\)"),
    ({"kind": "mock", "kv_fault": "slow"},
     r"args\.engine\.kv_fault: must be one of lost, timeout, held \(got 'slow'\)"),
    ({"kind": "mock", "delay": 1}, r"args\.engine: unknown field\(s\) delay"),
])
def test_a_bad_engine_argument_is_refused_naming_its_field(args, message):
    with pytest.raises(ValueError, match=message):
        EngineSource.from_args(args)


def test_the_mock_engine_is_sized_like_the_pools_engine():
    plan = _plans(load_r1deployment(TINY))["decode"]
    engine = make_engine_client(plan, Path("/nonexistent"), EngineSource(kind="mock", token_delay_s=0.5))
    assert (engine.role, engine.block_size, engine.num_blocks, engine.token_delay_s) == (
        "decode", plan.engine.block_size, plan.engine.num_blocks, 0.5)


def test_speculation_reaches_every_pools_engine_and_a_checkpoint_without_an_mtp_layer_is_refused(tmp_path):
    from r1serve.runtime.model.tiny import make_tiny

    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["speculative"] = {"method": "mtp"}
    plans = _plans(parse_r1deployment(doc))
    assert {pool: plan.engine.speculative_tokens for pool, plan in plans.items()} == {"prefill": 1, "decode": 1}
    without = make_tiny(tmp_path / "no-mtp", overrides={"num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match=r"spec\.speculative: the checkpoint has no MTP layer to draft with"):
        make_engine_client(plans["decode"], without)
    del doc["spec"]["speculative"]
    assert {plan.engine.speculative_tokens for plan in _plans(parse_r1deployment(doc)).values()} == {0}
