"""Queue-depth autoscaling policies of the pools (Ray Serve custom policies, named in the Serve config).

Serve builds a class policy once with the config's `policy_kwargs` and calls it on every tick with an
AutoscalingContext; replicas feed it through `record_autoscaling_stats`. The decisions themselves are the
pure functions of `scaling.py`; this module only reads the context. Serve applies the up/down-scale
delays, factors and min/max clamping around the returned count (and its cold-start fast path from zero
replicas), so none of that is repeated here. It runs in the Serve controller: it imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from .scaling import Bounds, Decision, decode_decision, prefill_decision, within_ratio

QUEUED_PROMPT_TOKENS = "queued_prompt_tokens"
ONGOING_REQUESTS = "ongoing_requests"
KV_CACHE_USAGE = "kv_cache_usage"
# The policy state key holding the last decision (Decision.to_dict()).
DECISION = "decision"


def total(ctx: Any, metric: str) -> float | None:
    """The sum over running replicas of a replica-published metric (averaged over the look-back window);
    None before any replica has reported it."""
    per_replica = (ctx.aggregated_metrics or {}).get(metric)
    return float(sum(per_replica.values())) if per_replica else None


def bounds(ctx: Any) -> Bounds:
    """The deployment's replica bounds (adjusted for target capacity)."""
    return Bounds(int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas))


def waiting(ctx: Any) -> int:
    """Requests waiting at the handles for a replica: with none running, every ongoing request waits."""
    if ctx.current_num_replicas:
        return 0
    return round(getattr(ctx, "total_num_requests", 0) or 0)


def _hold(pool: str, ctx: Any, signal: str, target: float) -> Decision:
    current = ctx.current_num_replicas
    return Decision(pool, current, bounds(ctx).clamp(current), signal, 0.0, target,
                    "holding: no replica has reported its load yet")


def prefill_from(ctx: Any, target_queued_tokens: float) -> Decision:
    queued = total(ctx, QUEUED_PROMPT_TOKENS)
    if queued is None and ctx.current_num_replicas:
        return _hold("prefill", ctx, "queued prompt tokens", target_queued_tokens)
    return prefill_decision(ctx.current_num_replicas, queued or 0.0, target_queued_tokens, bounds(ctx),
                            waiting(ctx))


def decode_from(ctx: Any, target_ongoing: float, target_kv: float) -> Decision:
    ongoing, kv = total(ctx, ONGOING_REQUESTS), total(ctx, KV_CACHE_USAGE)
    if (ongoing is None or kv is None) and ctx.current_num_replicas:
        return _hold("decode", ctx, "running + waiting sequences", target_ongoing)
    return decode_decision(ctx.current_num_replicas, ongoing or 0.0, kv or 0.0, target_ongoing, target_kv,
                           bounds(ctx), waiting(ctx))


def _check_prefill(target_queued_tokens: float) -> None:
    if target_queued_tokens <= 0:
        raise ValueError(f"target_queued_tokens: must be positive (got {target_queued_tokens})")


def _check_decode(target_ongoing_requests: float, target_kv_cache_usage: float) -> None:
    if target_ongoing_requests <= 0:
        raise ValueError(f"target_ongoing_requests: must be positive (got {target_ongoing_requests})")
    if not 0 < target_kv_cache_usage <= 1:
        raise ValueError(f"target_kv_cache_usage: must be in (0, 1] (got {target_kv_cache_usage})")


def _publish(decision: Decision) -> None:
    """Hands the decision to the status board (`status_board.py`), never failing the policy."""
    try:
        from .status_board import publish
    except ImportError:  # the board is optional: a policy decides without it
        return
    publish(decision)


class PrefillPolicy:
    """Replicas for the pool's queued prompt tokens at `target_queued_tokens` per replica."""

    def __init__(self, target_queued_tokens: int):
        _check_prefill(target_queued_tokens)
        self.target = target_queued_tokens

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        decision = prefill_from(ctx, self.target)
        _publish(decision)
        return decision.desired, {DECISION: decision.to_dict()}


class DecodePolicy:
    """Replicas for running + waiting sequences against their target, or KV-cache use against its target."""

    def __init__(self, target_ongoing_requests: int, target_kv_cache_usage: float):
        _check_decode(target_ongoing_requests, target_kv_cache_usage)
        self.target_ongoing = target_ongoing_requests
        self.target_kv = target_kv_cache_usage

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        decision = decode_from(ctx, self.target_ongoing, self.target_kv)
        _publish(decision)
        return decision.desired, {DECISION: decision.to_dict()}


class RatioPolicy:
    """Application-level policy: both pools' own decisions, then the prefill:decode ratio band.

    Serve hands it every deployment of the application; those that are not pools (the Ingress) get
    Serve's default policy on ongoing requests, as they would without an application-level policy.
    """

    def __init__(self, prefill_deployment: str, decode_deployment: str, target_queued_tokens: int,
                 target_ongoing_requests: int, target_kv_cache_usage: float, ratio_min: float, ratio_max: float):
        _check_prefill(target_queued_tokens)
        _check_decode(target_ongoing_requests, target_kv_cache_usage)
        if not 0 < ratio_min <= ratio_max:
            raise ValueError(f"ratio_min, ratio_max: need 0 < min <= max (got {ratio_min}, {ratio_max})")
        self.names = {"prefill": prefill_deployment, "decode": decode_deployment}
        self.prefill = PrefillPolicy(target_queued_tokens)
        self.decode = DecodePolicy(target_ongoing_requests, target_kv_cache_usage)
        self.low, self.high = ratio_min, ratio_max

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        by_name = {ctx.deployment_name: (dep_id, ctx) for dep_id, ctx in contexts.items()}
        desired: dict = {}
        state: dict = {}
        pools = {role: by_name.get(name) for role, name in self.names.items()}
        if pools["prefill"] and pools["decode"]:
            (p_id, p_ctx), (d_id, d_ctx) = pools["prefill"], pools["decode"]
            pre = prefill_from(p_ctx, self.prefill.target)
            dec = decode_from(d_ctx, self.decode.target_ongoing, self.decode.target_kv)
            pre, dec = within_ratio(pre, dec, self.low, self.high, bounds(p_ctx), bounds(d_ctx))
            for dep_id, decision in ((p_id, pre), (d_id, dec)):
                _publish(decision)
                desired[dep_id], state[dep_id] = decision.desired, {DECISION: decision.to_dict()}
        for dep_id, ctx in contexts.items():
            if dep_id not in desired:
                desired[dep_id], state[dep_id] = _default_policy(ctx)
        return desired, state


def _default_policy(ctx: Any) -> tuple[float, dict]:
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    value, _ = replica_queue_length_autoscaling_policy(ctx)
    return value, {}


# The import paths in r1serve.spec.constants (PREFILL_POLICY, DECODE_POLICY, RATIO_POLICY).
prefill_policy = PrefillPolicy
decode_policy = DecodePolicy
ratio_policy = RatioPolicy
