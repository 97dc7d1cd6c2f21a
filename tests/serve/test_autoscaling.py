"""Queue-depth policies: replicas = ceil(signal / target) within the deployment's bounds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from r1serve.runtime.serve.autoscaling import (
    DecodePolicy,
    PrefillPolicy,
    decode_policy,
    prefill_policy,
)


def ctx(metrics: dict, current: int = 1, low: int = 1, high: int = 8):
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=current,
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
    assert policy(ctx(by_kv))[0] == 4
    assert policy(ctx({"ongoing_requests": {"a": 0}, "kv_cache_usage": {"a": 0}}, low=0))[0] == 0


def test_policies_hold_until_replicas_report():
    assert PrefillPolicy(10)(ctx({}, current=3))[0] == 3
    assert DecodePolicy(8, 0.8)(ctx({"ongoing_requests": {}}, current=2))[0] == 2


def test_bad_targets_are_refused_by_name():
    with pytest.raises(ValueError, match="target_queued_tokens"):
        PrefillPolicy(0)
    with pytest.raises(ValueError, match="target_kv_cache_usage"):
        DecodePolicy(8, 1.5)
