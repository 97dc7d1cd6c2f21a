"""Errors raised while reading or writing a checkpoint; each names the file and tensor concerned."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; ``file`` and ``tensor`` say where the problem lies."""

    def __init__(self, problem: str, *, file: str | Path | None = None, tensor: str | None = None) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = [part for part in (self.file, f"tensor {tensor!r}" if tensor else None) if part]
        super().__init__(f"{': '.join(where)}: {problem}" if where else problem)
