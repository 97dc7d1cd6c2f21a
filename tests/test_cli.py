"""The `r1serve` command line as a user runs it: make a tiny checkpoint, check it, generate from it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from r1serve.cli import main


def test_make_tiny_then_generate(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["checkpoint", "make-tiny", str(out), "--seed", "3", "--set", "q_lora_rank=null"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["q_lora_rank"] is None and config["vocab_size"] == 129280
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert main(["checkpoint", "make-tiny", str(out), "--if-missing"]) == 0
    assert main(["checkpoint", "check", str(out)]) == 0
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Hi", "--chat", "--max-tokens", "5"]) == 0
    assert "5 generated" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Hi", "--max-tokens", "5",
                 "--speculative-tokens", "1"]) == 0
    assert "5 generated, 0 of 3 draft tokens kept" in capsys.readouterr().out  # a random MTP layer; none for the last


@pytest.mark.parametrize(
    "argv,message",
    [
        (["checkpoint", "make-tiny", "{tmp}/x", "--set", "nonsense=1"], "unknown config field 'nonsense'"),
        (["checkpoint", "make-tiny", "{tmp}/x", "--set", "n_group"], "expected KEY=VALUE"),
        (["checkpoint", "make-tiny", "{tmp}/x", "--set", "n_group=3"], "n_group: 3 does not divide n_routed_experts"),
        (["checkpoint", "check", "{tmp}/missing"], "no config.json"),
        (["generate", "--checkpoint", "{tmp}/missing", "--prompt", "x"], "missing"),
        (["spec", "validate", "{tmp}/missing.yaml"], "missing.yaml"),
        (["checkpoint", "fit-mtp", "{tmp}/missing"], "missing"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1serve: error:") and message in err and "Traceback" not in err


def test_existing_checkpoint_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["checkpoint", "make-tiny", str(out)]) == 0
    assert main(["checkpoint", "make-tiny", str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_package_does_not_shadow_the_standard_library():
    """`r1serve.operator` lives in operator/ on disk; `import operator` must still be the stdlib's."""
    code = "import r1serve.operator, operator, sysconfig; print(operator.__file__)"
    path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import sysconfig

    assert path.startswith(sysconfig.get_paths()["stdlib"])


def test_status_prints_each_pool_with_its_last_decision(capsys):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    document = {"pools": {"decode": {"currentReplicas": 1, "desiredReplicas": 2, "lastScaleDecision": None,
                                     "lastDecision": {"pool": "decode", "current": 1, "desired": 2,
                                                      "signal": "running + waiting sequences", "value": 20.0,
                                                      "target": 8, "reason": "20.0 per replica > target 8",
                                                      "at": 0.0}}}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(document).encode() if self.path == "/r1serve/v1/status" else b"{}"
            self.send_response(200 if self.path == "/r1serve/v1/status" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert main(["status", "--url", f"http://127.0.0.1:{server.server_port}"]) == 0
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert "decode: 1 replicas, desired 2" in out
    assert "running + waiting sequences 20 in the pool vs target 8 per replica" in out
    assert main(["status", "--url", "http://127.0.0.1:1"]) == 1
    assert main(["status", "--url", "https://127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"]) == 2
    assert "--ca-file /nonexistent/ca.pem" in capsys.readouterr().err


def test_fp8_weights_for_a_checkpoint_without_them_is_one_clear_line(tiny_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--weights", "fp8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1serve: error:") and "weights: fp8 needs a checkpoint with FP8 weights" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("weights", ["fp8", "dequantized"])
def test_checkpoint_check_reports_the_weight_bytes_a_rank_holds(tiny_checkpoints, capsys, weights):
    import torch

    from r1serve.runtime.model.model import DeepseekV3ForCausalLM

    checkpoint = tiny_checkpoints["fp8"]
    # What one process that holds every expert really holds: its parameters and the routers' bias buffers.
    model = DeepseekV3ForCausalLM.from_checkpoint(checkpoint, torch.bfloat16, progress=False, weights=weights)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    experts = sum(p.numel() * p.element_size() for m in model.moe_layers() for p in m.experts.parameters())
    n = model.config.n_routed_experts
    assert main(["checkpoint", "check", str(checkpoint), "--weights", weights, "--expert-parallel", "4",
                 "--redundant", "4"]) == 0
    out = capsys.readouterr().out
    # Each of 4 ranks holds (n + 4) / 4 expert slots and every other weight whole.
    routed = experts * (n + 4) // 4 // n
    line = next(line for line in out.splitlines() if line.startswith("weights ("))
    assert line == (f"weights ({weights}, bfloat16, expert parallel 4, 4 redundant): "
                    f"{(routed + held - experts) / 2**30:.2f} GiB per rank (routed experts {routed / 2**30:.2f} GiB, "
                    f"replicated weights {(held - experts) / 2**30:.2f} GiB)")
    from r1serve.runtime.model.config import ModelConfig
    from r1serve.runtime.model.memory import weight_bytes_per_rank

    exact = weight_bytes_per_rank(ModelConfig.from_file(checkpoint), weights=weights, dtype_bytes=2)
    assert (exact.routed_experts, exact.replicated) == (experts, held - experts)


def test_a_rank_holds_its_share_of_the_mtp_layers_experts_and_the_rest_of_the_layer_whole(tiny_checkpoint):
    from r1serve.runtime.model.config import ModelConfig
    from r1serve.runtime.model.memory import weight_bytes_per_rank

    config = ModelConfig.from_file(tiny_checkpoint)
    one, four = (weight_bytes_per_rank(config, weights="fp8", dtype_bytes=2, expert_parallel=n, mtp=True)
                 for n in (1, 4))
    experts = config.n_routed_experts * 3 * config.hidden_size * config.moe_intermediate_size * 2  # dequantized
    assert one.mtp_layer - four.mtp_layer == experts - experts // 4
    assert one.mtp_layer > experts  # attention, shared expert, embedding and head on top


def test_spec_validate_warns_when_weights_alone_exceed_a_share_of_the_gpus(tiny_checkpoint, capsys, tmp_path):
    from pathlib import Path

    import yaml

    examples = Path(__file__).resolve().parents[1] / "examples"
    argv = ["spec", "validate", str(examples / "r1-production.yaml"), "--checkpoint", str(tiny_checkpoint)]
    assert main(argv) == 2  # R1's layout does not fit the tiny checkpoint's 16 experts
    assert ("spec.prefill.expertParallel: the checkpoint's 16 routed experts + experts.redundant 32 do not divide "
            "over 32 ranks") in capsys.readouterr().err
    doc = yaml.safe_load((examples / "tiny.yaml").read_text())
    for pool in ("prefill", "decode"):
        doc["spec"][pool]["gpusPerRank"] = 1
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(doc))
    argv = ["spec", "validate", str(tmp_path / "gpu.yaml"), "--checkpoint", str(tiny_checkpoint)]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err  # a tiny model fits any GPU
    assert main([*argv, "--gpu-memory-gib", "0.001"]) == 0
    err = capsys.readouterr().err
    for pool in ("prefill", "decode"):
        assert f"r1serve: warning: spec.{pool}: weights alone take" in err
    assert "more than 85% of 1 x 0.001 GiB (--gpu-memory-gib, --max-weight-share)" in err
    assert main([*argv, "--max-weight-share", "1.5"]) == 2
    assert "--max-weight-share: must be in (0, 1] (got 1.5)" in capsys.readouterr().err
    doc["spec"]["speculative"] = {"method": "mtp"}  # the MTP layer counts too
    (tmp_path / "mtp.yaml").write_text(yaml.safe_dump(doc))
    argv = ["spec", "validate", str(tmp_path / "mtp.yaml"), "--checkpoint", str(tiny_checkpoint)]
    assert main([*argv, "--gpu-memory-gib", "0.001"]) == 0
    assert ", MTP layer 0." in capsys.readouterr().err
    from r1serve.runtime.model.tiny import make_tiny

    without = make_tiny(tmp_path / "no-mtp", overrides={"num_nextn_predict_layers": 0})
    assert main(["spec", "validate", str(tmp_path / "mtp.yaml"), "--checkpoint", str(without)]) == 2
    assert "spec.speculative: the checkpoint has no MTP layer to draft with" in capsys.readouterr().err
