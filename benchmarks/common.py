"""Shared by the benchmarks: a description of the machine, and recording a result into benchmarks/README.md."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in ["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record(section: str, body: str) -> None:
    """Replace this benchmark's section of benchmarks/README.md (between its markers) with `body`."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    block = (f"<!-- {section}:begin -->\n{body}\n\nCommand: `{command()}`  \nMachine: {machine()}  \n"
             f"Recorded: {stamp}\n<!-- {section}:end -->")
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {re.escape(section)}:begin -->.*?<!-- {re.escape(section)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)
