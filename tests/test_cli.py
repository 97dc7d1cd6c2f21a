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


@pytest.mark.parametrize(
    "argv,message",
    [
        (["checkpoint", "make-tiny", "{tmp}/x", "--set", "nonsense=1"], "unknown config field 'nonsense'"),
        (["checkpoint", "make-tiny", "{tmp}/x", "--set", "n_group"], "expected KEY=VALUE"),
        (["checkpoint", "make-tiny", "{tmp}/x", "--set", "n_group=3"], "n_group: 3 does not divide n_routed_experts"),
        (["checkpoint", "check", "{tmp}/missing"], "no config.json"),
        (["generate", "--checkpoint", "{tmp}/missing", "--prompt", "x"], "missing"),
        (["spec", "validate", "{tmp}/missing.yaml"], "missing.yaml"),
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
