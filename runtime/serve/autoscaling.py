"""Queue-depth autoscaling policies of the pools (Ray Serve custom policies, named in the Serve config).

Serve builds a class policy once with the config's `policy_kwargs` and calls it on every tick with an
AutoscalingContext; replicas feed it through `record_autoscaling_stats`. Serve applies the up/down-scale
delays around the decision. This module is pickled by value into the controller: it imports nothing
heavy.
"""

from __future__ import annotations

import math
from typing import Any

QUEUED_PROMPT_TOKENS = "queued_prompt_tokens"
ONGOING_REQUESTS = "ongoing_requests"
KV_CACHE_USAGE = "kv_cache_usage"


def total(ctx: Any, metric: str) -> float | None:
    """The sum over running replicas of a replica-published metric (averaged over the look-back window);
    None before any replica has reported it."""
    per_replica = (ctx.aggregated_metrics or {}).get(metric)
    return float(sum(per_replica.values())) if per_replica else None


def bounded(ctx: Any, desired: float) -> int:
    """ceil(desired) within the deployment's replica bounds (adjusted for target capacity)."""
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return int(min(max(math.ceil(desired), low), high))


class PrefillPolicy:
    """Replicas = queued prompt tokens in the pool / target per replica."""

    def __init__(self, target_queued_tokens: int):
        if target_queued_tokens <= 0:
            raise ValueError(f"target_queued_tokens: must be positive (got {target_queued_tokens})")
        self.target = target_queued_tokens

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        queued = total(ctx, QUEUED_PROMPT_TOKENS)
        if queued is None:  # nothing reported yet: hold
            return bounded(ctx, ctx.current_num_replicas), {}
        return bounded(ctx, queued / self.target), {QUEUED_PROMPT_TOKENS: queued}


class DecodePolicy:
    """Replicas = the larger of running+waiting sequences / target and total KV-cache use / target use."""

    def __init__(self, target_ongoing_requests: int, target_kv_cache_usage: float):
        if target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests: must be positive (got {target_ongoing_requests})")
        if not 0 < target_kv_cache_usage <= 1:
            raise ValueError(f"target_kv_cache_usage: must be in (0, 1] (got {target_kv_cache_usage})")
        self.target_ongoing = target_ongoing_requests
        self.target_kv = target_kv_cache_usage

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        ongoing, kv = total(ctx, ONGOING_REQUESTS), total(ctx, KV_CACHE_USAGE)
        if ongoing is None or kv is None:  # nothing reported yet: hold
            return bounded(ctx, ctx.current_num_replicas), {}
        desired = max(ongoing / self.target_ongoing, kv / self.target_kv)
        return bounded(ctx, desired), {ONGOING_REQUESTS: ongoing, KV_CACHE_USAGE: kv}


# The import paths in r1serve.spec.constants (PREFILL_POLICY, DECODE_POLICY).
prefill_policy = PrefillPolicy
decode_policy = DecodePolicy
