"""benchmarks/kv_device.py --small: both hand-off paths run between two processes and report every size (the
GPU run uses the same code with CUDA IPC; nothing about speed is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_device.py"


def test_the_device_hand_off_benchmark_reports_every_size(tmp_path):
    out = tmp_path / "kv.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and [r["tokens"] for r in data["rows"]] == [64, 256]
    for row in data["rows"]:
        assert row["bytes"] == 61 * row["tokens"] * 576 * 2
        assert all(row[key] > 0 for key in ("copy_s", "ipc_s", "host_s"))
    assert "| 256 |" in proc.stdout
