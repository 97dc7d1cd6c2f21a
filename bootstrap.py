#!/usr/bin/env python3
"""Sets up a virtual environment in .venv and runs r1serve from it.

    python3 bootstrap.py serve   # install, then serve examples/tiny.yaml (gRPC :9000, HTTP :8000)
    python3 bootstrap.py test    # install with test extras and run the whole test suite

Only Python 3.11+ and pip are needed. Installation is skipped when pyproject.toml and protos/ have not changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
TORCH = "torch==2.13.0"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    # The repository's operator/ folder would shadow the standard library's `operator` module for any
    # `python -m`/`-c` started here; safe-path mode keeps the working directory off sys.path.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def install(extras: str) -> None:
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".r1serve-installed"
    # The gRPC stubs are compiled at install time: a changed .proto installs again, as pyproject.toml does.
    sources = [ROOT / "pyproject.toml", *sorted((ROOT / "protos").rglob("*.proto"))]
    wanted = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + extras.encode()).hexdigest()
    if stamp.exists() and wanted in stamp.read_text().split():
        return
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
    # Set R1SERVE_TORCH_INDEX_URL (e.g. PyTorch's CPU wheel index) to choose where it comes from.
    index = os.environ.get("R1SERVE_TORCH_INDEX_URL")
    run(*pip, TORCH, *(["--index-url", index] if index else []))
    run(*pip, "-e", f".[{extras}]" if extras else ".")
    previous = stamp.read_text() if stamp.exists() else ""
    stamp.write_text(previous + wanted + "\n")


def serve(args: list[str]) -> None:
    install("")
    # The tiny checkpoint is written to .r1serve/models/ on first use; Ctrl-C stops the server.
    try:
        run(BIN / "r1serve", "serve", "examples/tiny.yaml", *args)
    except KeyboardInterrupt:
        pass


def test(args: list[str]) -> None:
    install("test")
    run(PYTHON, "-m", "pytest", *(args or ["-q"]))


def main() -> int:
    commands = {"serve": serve, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    if sys.version_info < (3, 11):
        print("r1serve needs Python 3.11 or newer", file=sys.stderr)
        return 2
    try:
        commands[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
