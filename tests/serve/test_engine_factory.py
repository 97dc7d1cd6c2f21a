"""The engine a pool replica gets: exactly what its section of the resource asks for, or an error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from r1serve.runtime.serve.engine_factory import make_engine_client
from r1serve.spec import load_r1deployment

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


@pytest.mark.parametrize("role,pool", [("decode", "decode"), ("prefill", "prefill")])
def test_a_pool_asking_for_ranks_never_silently_runs_in_one_process(monkeypatch, tmp_path, role, pool):
    deployment = load_r1deployment(TINY)
    assert getattr(deployment.spec, pool).expert_parallel == 2
    monkeypatch.setitem(sys.modules, "r1serve.runtime.parallel.serve_group", None)  # cannot be imported
    with pytest.raises(RuntimeError, match=rf"spec\.{pool}\.expertParallel: 2 ranks need the expert-parallel "
                                           "runtime, which cannot be imported here"):
        make_engine_client(deployment, role, tmp_path)
