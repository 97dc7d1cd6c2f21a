"""The scaling decisions as pure functions, replayed over recorded signal sequences (no Ray)."""

from __future__ import annotations

import pytest

from r1serve.runtime.serve.scaling import Bounds, decode_decision, prefill_decision, within_ratio

BOUNDS = Bounds(1, 8)


def _replay(signals, target=1000, bounds=BOUNDS, start=1):
    """Apply each decision at once (Serve adds its delays around these) and record the counts."""
    current, counts = start, []
    for load in signals:
        current = prefill_decision(current, load, target, bounds).desired
        counts.append(current)
    return counts


def test_a_step_up_adds_replicas_for_the_queue():
    assert _replay([500, 3500, 3500]) == [1, 4, 4]


def test_a_step_down_keeps_a_margin_below_target():
    # 4 replicas; load falls to 1500: 2 replicas would run at 750 (<= 80% of 1000), so 2.
    assert _replay([3500, 1500, 1500], start=4) == [4, 2, 2]


def test_steady_load_near_the_target_does_not_flap():
    counts = _replay([1900, 2100, 1950, 2050, 1850, 2000], start=2)
    changes = sum(a != b for a, b in zip(counts, counts[1:]))
    assert counts == [2, 3, 3, 3, 3, 3] and changes == 1  # up once when 2100 exceeds 2 x target, then holds
    assert _replay([1700, 1750, 1700], start=2) == [2, 2, 2]  # 850/replica: inside the band, no change


def test_bounds_are_respected():
    assert _replay([10**9], bounds=Bounds(1, 3)) == [3]
    assert _replay([0, 0], bounds=Bounds(2, 8), start=5) == [2, 2]


def test_zero_replicas_only_with_min_zero_and_the_first_request_wakes_the_pool():
    zero = Bounds(0, 4)
    assert prefill_decision(1, 0, 1000, zero).desired == 0
    assert prefill_decision(1, 0, 1000, BOUNDS).desired == 1
    woken = prefill_decision(0, 0, 1000, zero, waiting=1)
    assert woken.desired == 1 and "waiting" in woken.reason
    assert prefill_decision(0, 0, 1000, zero).desired == 0


def test_decode_scales_on_kv_use_when_sequences_are_few_but_long():
    d = decode_decision(current=2, ongoing=10, kv_usage_sum=1.9, target_ongoing=64, target_kv=0.8, bounds=BOUNDS)
    assert d.desired == 3 and d.signal == "KV-cache use"
    d = decode_decision(current=2, ongoing=300, kv_usage_sum=0.2, target_ongoing=64, target_kv=0.8, bounds=BOUNDS)
    assert d.desired == 5 and d.signal == "running + waiting sequences"


def test_the_decision_says_why():
    d = prefill_decision(1, 5000, 1000, BOUNDS)
    assert d.to_dict() == {"pool": "prefill", "current": 1, "desired": 5, "signal": "queued prompt tokens",
                           "value": 5000, "target": 1000,
                           "reason": "queued prompt tokens: 5000.0 per replica > target 1000"}


@pytest.mark.parametrize("p,d,expected", [(1, 4, (2, 4)), (6, 2, (6, 3)), (2, 4, (2, 4))])
def test_ratio_band_raises_the_pool_that_falls_short(p, d, expected):
    pre = prefill_decision(p, p * 1000, 1000, BOUNDS)
    dec = decode_decision(d, d * 64, 0, 64, 0.8, BOUNDS)
    pre, dec = within_ratio(pre, dec, 0.5, 2.0, BOUNDS, BOUNDS)
    assert (pre.desired, dec.desired) == expected
