"""docs/RELIABILITY.md is rendered from recorded figures only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability_report.py"


def _module():
    spec = importlib.util.spec_from_file_location("reliability_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_tables_from_recorded_results(tmp_path):
    report = _module()
    report.record("soak", "load", what="256 streams", requests=256, failed=0, duration_s=12.34,
                  results_dir=tmp_path)
    report.record("kill", "fault", what="kill | decode", requests=8, failed=2, failures="2 UNAVAILABLE",
                  recovery_s=3.0, results_dir=tmp_path)
    text = report.render(report.load(tmp_path))
    assert "| `soak` | 256 streams | 256 | 0 | — | 12.3 s |  |" in text
    assert "| `kill` | kill \\| decode | 8 | 2 | 2 UNAVAILABLE |  | 3.0 s |" in text
    assert "## Bad input\n\nNo results recorded yet." in text
    assert "gRPC TLS" in text


def test_check_mode(tmp_path):
    report = _module()
    out = tmp_path / "RELIABILITY.md"
    assert report.main(["--results", str(tmp_path / "none"), "--out", str(out), "--check"]) == 1
    assert report.main(["--results", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert report.main(["--results", str(tmp_path / "none"), "--out", str(out), "--check"]) == 0
