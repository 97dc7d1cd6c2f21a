"""Compiling the Triton kernels for Hopper (sm_90) without a GPU, in a fresh process and cache.

The interpreter checks the kernels' arithmetic, not that Triton's compiler accepts them. The kernels
must compile with the triton the tests install and with the GPU machines' own (an older 3.x): set
R1SERVE_OTHER_TRITON to a folder holding another triton (e.g. `pip install --target DIR triton==3.6.0
"numpy<2.3"`) and the compile tests run with it as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OTHER_TRITON = "R1SERVE_OTHER_TRITON"


def triton_sites() -> list[str]:
    """Parameters for the compile tests: the installed triton, and the other one when given."""
    return ["installed"] + ([os.environ[OTHER_TRITON]] if os.environ.get(OTHER_TRITON) else [])


def compile_for_hopper(script: str, cache_dir: Path, site: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # a fresh cache, so the compiler really runs
    if site != "installed":
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        script = f"import triton\nassert triton.__file__.startswith({site!r}), triton.__file__\n{script}"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
