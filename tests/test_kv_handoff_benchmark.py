"""benchmarks/kv_handoff.py --small: every connector hands a prompt's latents from one actor to another through a
third, as in the served graph, and the table reports each (nothing about speed is asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_handoff.py"


def test_the_hand_off_benchmark_runs_every_connector():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small"], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| prompt tokens"))
    for connector in ("object-store", "nixl", "gloo", "cuda-ipc"):
        assert f"| {connector}" in header, header
    assert "| 64 |" in proc.stdout
