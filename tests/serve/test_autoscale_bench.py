"""benchmarks/autoscale.py's simulator on a short trace: the policies react to a step and settle back."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

ray_policy = pytest.importorskip("ray.serve.autoscaling_policy")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "autoscale.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("autoscale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(SCRIPT.parent))


@pytest.mark.parametrize("kind", ["queue-depth", "serve-default"])
def test_a_step_grows_the_pools_and_quiet_shrinks_them(bench, kind, monkeypatch):
    clock = bench.Clock()
    monkeypatch.setattr(ray_policy, "time", clock)
    setup = dataclasses.replace(bench.Setup(), phases=((20.0, 1.0), (60.0, 6.0), (120.0, 0.2)), startup_s=5.0,
                                downscale_delay_s=20.0, dt=0.1)
    result = bench.simulate(setup, kind, clock)
    prefill, decode = result["history"]
    assert max(n for _, n in prefill) > 1 and max(n for _, n in decode) > 1
    assert prefill[-1][1] == decode[-1][1] == 1
    assert result["good"] > 0 and result["react_up"][0] is not None


def test_fixed_pools_never_scale(bench, monkeypatch):
    clock = bench.Clock()
    monkeypatch.setattr(ray_policy, "time", clock)
    setup = dataclasses.replace(bench.Setup(), phases=((5.0, 1.0), (5.0, 2.0), (5.0, 1.0)), dt=0.1)
    result = bench.simulate(setup, "fixed", clock)
    assert {n for _, n in result["history"][0]} == {setup.fixed} and result["react_up"] == (None, None)
