"""The Ray adapters of the scaling decisions: policies fed hand-built AutoscalingContexts (no cluster).

Delays are Serve's: the step-down-after-delay tests run the policies through Ray's own wrapper
(`_apply_autoscaling_config`, what the controller applies around a custom policy) on a fake clock.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from r1serve.runtime.serve.autoscaling import (
    DecodePolicy,
    PrefillPolicy,
    RatioPolicy,
    decode_policy,
    prefill_policy,
)


def ctx(metrics: dict, current: int = 1, low: int = 1, high: int = 8, requests: float = 0):
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=current, total_num_requests=requests,
                           capacity_adjusted_min_replicas=low, capacity_adjusted_max_replicas=high)


@pytest.mark.parametrize("queued,expected", [([0, 0], 1), ([1000, 0], 1), ([1500, 1500], 3), ([4000, 1500], 6),
                                             ([100000], 8)])
def test_prefill_scales_on_queued_prompt_tokens(queued, expected):
    policy = prefill_policy(target_queued_tokens=1000)
    metrics = {"queued_prompt_tokens": {f"r{i}": q for i, q in enumerate(queued)}}
    assert policy(ctx(metrics))[0] == expected


def test_decode_takes_the_larger_of_requests_and_kv_use():
    policy = decode_policy(target_ongoing_requests=8, target_kv_cache_usage=0.5)
    by_requests = {"ongoing_requests": {"a": 20, "b": 4}, "kv_cache_usage": {"a": 0.1, "b": 0.1}}
    by_kv = {"ongoing_requests": {"a": 2, "b": 2}, "kv_cache_usage": {"a": 0.9, "b": 0.8}}
    assert policy(ctx(by_requests))[0] == 3
    desired, state = policy(ctx(by_kv))
    assert desired == 4 and state["decision"]["signal"] == "KV-cache use"
    assert policy(ctx({"ongoing_requests": {"a": 0}, "kv_cache_usage": {"a": 0}}, low=0))[0] == 0


def test_the_state_carries_the_decision_with_its_reason():
    desired, state = PrefillPolicy(1000)(ctx({"queued_prompt_tokens": {"a": 5000}}))
    assert desired == 5
    assert state["decision"] == {"pool": "prefill", "current": 1, "desired": 5, "signal": "queued prompt tokens",
                                 "value": 5000.0, "target": 1000,
                                 "reason": "queued prompt tokens: 5000.0 per replica > target 1000"}


def test_policies_hold_until_replicas_report():
    assert PrefillPolicy(10)(ctx({}, current=3))[0] == 3
    desired, state = DecodePolicy(8, 0.8)(ctx({"ongoing_requests": {}}, current=2))
    assert desired == 2 and "holding" in state["decision"]["reason"]


def test_zero_replicas_wake_on_requests_waiting_at_the_handle():
    idle = ctx({}, current=0, low=0)
    assert PrefillPolicy(1000)(idle)[0] == 0
    assert DecodePolicy(8, 0.8)(idle)[0] == 0
    desired, state = DecodePolicy(8, 0.8)(ctx({}, current=0, low=0, requests=3))
    assert desired == 1 and "3 requests waiting" in state["decision"]["reason"]


def test_bad_targets_are_refused_by_name():
    with pytest.raises(ValueError, match="target_queued_tokens"):
        PrefillPolicy(0)
    with pytest.raises(ValueError, match="target_kv_cache_usage"):
        DecodePolicy(8, 1.5)
    with pytest.raises(ValueError, match="ratio_min"):
        RatioPolicy("P", "D", 1000, 8, 0.8, 3, 1)


# -- through Ray's own wrapper (delays, cold start), with real AutoscalingContexts -------------------

serve_config = pytest.importorskip("ray.serve.config")
ray_policy = pytest.importorskip("ray.serve.autoscaling_policy")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(ray_policy, "time", fake)  # the wrapper's delay logic reads time.time()
    return fake


def real_ctx(name: str, metrics: dict, current: int, target: int | None = None, requests: float = 0,
             low: int = 1, high: int = 4, state: dict | None = None):
    from ray.serve._private.common import DeploymentID

    config = serve_config.AutoscalingConfig(min_replicas=low, max_replicas=high, upscale_delay_s=5,
                                            downscale_delay_s=20)
    return serve_config.AutoscalingContext(
        deployment_id=DeploymentID(name=name, app_name="r1serve"), deployment_name=name, app_name="r1serve",
        current_num_replicas=current, target_num_replicas=current if target is None else target,
        running_replicas=[], total_num_requests=requests, total_queued_requests=0, aggregated_metrics=metrics,
        raw_metrics={}, capacity_adjusted_min_replicas=low, capacity_adjusted_max_replicas=high,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None, current_time=None,
        config=config)


def replay(policy, loads: list[float], clock: Clock, start: int = 1, step_s: float = 1.0) -> list[int]:
    """Feeds queued-token loads once a second through Ray's wrapper and applies each decision at once."""
    wrapped = ray_policy._apply_autoscaling_config(policy)
    current, state, counts = start, {}, []
    for load in loads:
        metrics = {"queued_prompt_tokens": {f"r{i}": load / max(current, 1) for i in range(current)}}
        current, state = wrapped(real_ctx("PrefillServer", metrics, current, state=state))
        counts.append(current)
        clock.now += step_s
    return counts


def test_step_up_waits_for_the_upscale_delay(clock):
    counts = replay(PrefillPolicy(1000), [3500] * 8, clock)
    assert counts == [1, 1, 1, 1, 1, 4, 4, 4]  # 5 s upscale delay, then straight to 4


def test_step_down_only_after_the_downscale_delay(clock):
    counts = replay(PrefillPolicy(1000), [500] * 25, clock, start=4)
    assert counts[:20] == [4] * 20 and counts[20:] == [1] * 5


def test_a_blip_does_not_scale_and_the_dead_band_holds(clock):
    counts = replay(PrefillPolicy(1000), [1700] * 10 + [2500] * 3 + [1700] * 10, clock, start=2)
    assert set(counts) == {2}  # 850 per replica is inside the band; a 3 s burst is shorter than the delay


def test_cold_start_from_zero_is_immediate(clock):
    wrapped = ray_policy._apply_autoscaling_config(DecodePolicy(8, 0.8))
    desired, _ = wrapped(real_ctx("DecodeServer", {}, current=0, requests=2, low=0))
    assert desired == 1


def test_ratio_policy_raises_the_short_pool_and_leaves_the_ingress_to_serve_default(clock):
    policy = ray_policy._apply_app_level_autoscaling_config(
        RatioPolicy("PrefillServer", "DecodeServer", 1000, 8, 0.8, 0.5, 2.0))
    contexts = {}
    for name, metrics, current in (
            ("PrefillServer", {"queued_prompt_tokens": {"p": 0}}, 1),
            ("DecodeServer", {"ongoing_requests": {"d": 40}, "kv_cache_usage": {"d": 0.1}}, 4),
            ("Ingress", {}, 1)):
        c = real_ctx(name, metrics, current, high=8)
        contexts[c.deployment_id] = c
    clock.now += 0
    for _ in range(6):  # past the 5 s upscale delay
        decisions, states = policy(contexts)
        for dep_id, c in contexts.items():
            c.policy_state = states[dep_id]
        clock.now += 1
    by_name = {dep_id.name: n for dep_id, n in decisions.items()}
    assert by_name == {"PrefillServer": 3, "DecodeServer": 5, "Ingress": 1}  # 3:5 >= 0.5
    prefill_state = next(s for d, s in states.items() if d.name == "PrefillServer")
    assert "ratio band" in prefill_state["decision"]["reason"]
