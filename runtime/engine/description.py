"""How an engine runs, in words: shared by its start-up log and `r1serve status` (no torch import here)."""

from __future__ import annotations

from collections.abc import Mapping


def format_engine(description: Mapping[str, str]) -> str:
    """"on cuda:0, kernels triton, CUDA graphs 12 graphs, batch 1-256, 850 MiB" (plus the ranks of a group)."""
    line = (f"on {description.get('device', '?')}, kernels {description.get('kernels', '?')}, "
            f"CUDA graphs {description.get('cudaGraphs', '?')}")
    if description.get("weights"):  # how an FP8 checkpoint's weights are held: fp8 or dequantized
        line = f"{line}, weights {description['weights']}"
    if description.get("speculative"):
        line = f"{line}, speculative {description['speculative']}"
    ranks = description.get("ranks")
    if ranks and ranks != "1":
        line = f"{line}, {ranks} expert-parallel ranks"
    connector = description.get("kvConnector")
    return f"{line}, KV hand-off {connector}" if connector else line
