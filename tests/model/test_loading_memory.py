"""Loading streams the checkpoint: peak memory stays near one copy of the weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from r1serve.runtime.model.tiny import make_tiny

# Big enough that the weights dwarf the interpreter and torch (~520 MB in float32), with most of them in
# experts as in the real model, so that two copies would clearly exceed the bound.
LARGER = {
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "n_routed_experts": 64,
    "moe_intermediate_size": 256,
    "intermediate_size": 512,
}

# VmHWM (this address space's peak), not ru_maxrss, which Linux carries over from the parent across exec.
MEASURE = """
import json, sys, torch
# torch imports dynamo (and with it triton, when installed) lazily, the first time the model is built on
# the meta device: a one-time library cost that loading the weights does not own.
import torch._dynamo
from r1serve.runtime.model.model import DeepseekV3ForCausalLM
def kib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
before = kib("VmHWM")
model = DeepseekV3ForCausalLM.from_checkpoint(sys.argv[1], torch.float32, progress=False)
peak = kib("VmHWM")
sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
print(json.dumps({"before": before, "peak": peak, "weights": sum(sizes), "largest": max(sizes)}))
"""


@pytest.mark.slow
def test_peak_memory_is_about_one_copy_of_the_weights(tmp_path):
    checkpoint = make_tiny(tmp_path / "larger", overrides=LARGER)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoint)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    growth = m["peak"] - m["before"]
    assert m["weights"] > 3.5 * m["largest"]
    # One copy of the weights, plus the one tensor being read (and its shard's mapped pages).
    bound = m["weights"] + m["largest"] + 96e6
    assert growth < bound, f"loading grew memory by {growth / 1e6:.0f} MB for {m['weights'] / 1e6:.0f} MB of weights"
