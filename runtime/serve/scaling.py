"""Queue-depth scaling decisions as pure functions: replica signals in, a replica count and its reason out.

Ray Serve calls these through the policies in `autoscaling.py`, and applies the spec's up- and down-scale
delays around them; the same functions drive the autoscaling benchmark's simulator. They import nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Scale down only when fewer replicas would still run at most this far below target: load that hovers
# around the target never adds and removes the same replica in turn.
DEAD_BAND = 0.2


@dataclass(frozen=True)
class Bounds:
    min: int
    max: int

    def clamp(self, n: int) -> int:
        return max(self.min, min(self.max, n))


@dataclass(frozen=True)
class Decision:
    """One scaling decision, as `r1serve status` and the R1Deployment status show it."""

    pool: str
    current: int
    desired: int
    signal: str
    value: float  # the signal summed over the pool's replicas
    target: float  # per replica
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def queue_depth_replicas(load: float, target: float, current: int, bounds: Bounds, waiting: int = 0,
                         dead_band: float = DEAD_BAND) -> tuple[int, str]:
    """Replicas for `load` (summed over the pool) at `target` per replica, with hysteresis.

    Up: as many replicas as load / target needs. Down: only to a count that keeps every replica at most
    (1 - dead_band) x target. No replicas: `waiting` requests queued in front of the pool wake it up.
    """
    if current == 0:
        if load > 0 or waiting > 0:
            return bounds.clamp(max(1, math.ceil(load / target))), f"{waiting} requests waiting for a replica"
        return bounds.clamp(0), "idle"
    if load <= 0:
        return bounds.clamp(bounds.min), "idle: nothing queued"
    needed = math.ceil(load / target)
    per_replica = load / current
    if needed > current:
        return bounds.clamp(needed), f"{per_replica:.1f} per replica > target {target:g}"
    keep = max(1, math.ceil(load / (target * (1 - dead_band))))
    if keep < current:
        floor = (1 - dead_band) * target
        return bounds.clamp(keep), f"{per_replica:.1f} per replica < {floor:.1f} ({1 - dead_band:.0%} of target)"
    return bounds.clamp(current), f"{per_replica:.1f} per replica, within the dead band of target {target:g}"


def prefill_decision(current: int, queued_tokens: float, target_queued_tokens: float, bounds: Bounds,
                     waiting: int = 0) -> Decision:
    desired, why = queue_depth_replicas(queued_tokens, target_queued_tokens, current, bounds, waiting)
    return Decision("prefill", current, desired, "queued prompt tokens", queued_tokens, target_queued_tokens,
                    f"queued prompt tokens: {why}")


def decode_decision(current: int, ongoing: float, kv_usage_sum: float, target_ongoing: float, target_kv: float,
                    bounds: Bounds, waiting: int = 0) -> Decision:
    """Sequences per replica against their target, and KV-cache use against its target: the larger wins."""
    by_load, why = queue_depth_replicas(ongoing, target_ongoing, current, bounds, waiting)
    by_kv, kv_why = queue_depth_replicas(kv_usage_sum, target_kv, current, bounds, 0)
    if current and by_kv > by_load:
        return Decision("decode", current, by_kv, "KV-cache use", kv_usage_sum, target_kv, f"KV-cache use: {kv_why}")
    return Decision("decode", current, by_load, "running + waiting sequences", ongoing, target_ongoing,
                    f"running + waiting sequences: {why}")


def within_ratio(prefill: Decision, decode: Decision, low: float, high: float, prefill_bounds: Bounds,
                 decode_bounds: Bounds) -> tuple[Decision, Decision]:
    """Keep prefill:decode replicas within [low, high] by raising the pool that falls short (never by
    taking capacity away from a pool its own signal says it needs)."""
    p, d = prefill.desired, decode.desired
    if d and p / d < low:
        raised = prefill_bounds.clamp(math.ceil(low * d))
        if raised != p:
            prefill = _raised(prefill, raised, f"ratio band: {p}:{d} is below {low:g}")
    elif p and d and p / d > high:
        raised = decode_bounds.clamp(math.ceil(p / high))
        if raised != d:
            decode = _raised(decode, raised, f"ratio band: {p}:{d} is above {high:g}")
    return prefill, decode


def _raised(decision: Decision, desired: int, why: str) -> Decision:
    return Decision(decision.pool, decision.current, desired, decision.signal, decision.value, decision.target,
                    f"{why} (own signal: {decision.reason})")
