"""The expert load an R1Deployment keeps across replica restarts: what it holds, how it is written, where it lives.

Replicas of an expert-parallel pool count the tokens routed to each expert. What they saw outlives them: on
Kubernetes the operator keeps it in a ConfigMap the R1Deployment owns, which every Ray pod mounts (optional, from
the first render, so that its later appearance restarts nothing); on one machine it is a file under the local
cache. A replica that starts places its experts from that load (balanced, with the redundant slots on the busiest
experts) instead of uniformly.

One entry per pool, `<pool>.json`: {"<MoE layer>": [load of expert 0, 1, ...], ...}, each layer scaled so that its
busiest expert is SCALE (whole numbers: small, and enough to balance by).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

SCALE = 65535
# Where the Ray pods mount the ConfigMap (a directory with one file per pool).
MOUNT_PATH = "/etc/r1serve/expert-load"
VOLUME = "expert-load"
# A ConfigMap holds at most 1 MiB; keep a margin for its metadata.
MAX_BYTES = 1024 * 1024 - 64 * 1024
# DeepSeek-V3/R1: 58 MoE layers (61 with the dense ones counted) of 256 routed experts.
LARGEST = (61, 256)


class ExpertLoadError(ValueError):
    """Kept expert load that cannot be used (another model's, or damaged)."""


def configmap_name(deployment: str) -> str:
    return f"{deployment}-expert-load"


def pool_key(pool: str) -> str:
    return f"{pool}.json"


def encode(load: Mapping[int, Sequence[float]]) -> str:
    """Per MoE layer, the load scaled so its busiest expert is SCALE; a layer that saw nothing is left out."""
    layers = {}
    for layer, counts in sorted(load.items()):
        top = max((float(c) for c in counts), default=0.0)
        if top > 0:
            layers[str(int(layer))] = [round(float(c) * SCALE / top) for c in counts]
    return json.dumps(layers, separators=(",", ":"))


def decode(text: str, *, num_experts: int | None = None, layers: Iterable[int] | None = None
           ) -> dict[int, list[float]]:
    """The kept load of a pool; with `num_experts` and `layers` (the model's MoE layers), one that does not fit
    the model raises ExpertLoadError saying why."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ExpertLoadError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ExpertLoadError(f"expected an object of MoE layer -> expert loads (got {type(raw).__name__})")
    known = set(layers) if layers is not None else None
    load: dict[int, list[float]] = {}
    for key, counts in raw.items():
        if not str(key).isdigit():
            raise ExpertLoadError(f"layer {key!r} is not a layer number")
        layer = int(key)
        if known is not None and layer not in known:
            raise ExpertLoadError(f"layer {layer} is not a MoE layer of this model")
        if not isinstance(counts, list) or not all(isinstance(c, (int, float)) and c >= 0 for c in counts):
            raise ExpertLoadError(f"layer {layer}: expected a list of non-negative numbers")
        if num_experts is not None and len(counts) != num_experts:
            raise ExpertLoadError(f"layer {layer}: {len(counts)} experts, the model has {num_experts}")
        load[layer] = [float(c) for c in counts]
    return load


def merge(loads: Iterable[Mapping[int, Sequence[float]]]) -> dict[int, list[float]]:
    """Several replicas' loads as one, each replica's layer weighed equally (they are scaled alike)."""
    total: dict[int, list[float]] = {}
    for load in loads:
        for layer, counts in load.items():
            before = total.get(int(layer), [0.0] * len(counts))
            total[int(layer)] = [a + float(b) for a, b in zip(before, counts)]
    return total
