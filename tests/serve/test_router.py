"""Routing policy: prefill by queued tokens net of cached prefix blocks, decode by load."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

from r1serve.runtime.engine.block_manager import prefix_hashes
from r1serve.runtime.serve.router import (
    Candidate,
    DecodeRouter,
    PrefillRouter,
    _Tracker,
    decode_order,
    matched_blocks,
    prefill_order,
)


def test_prefill_prefers_the_least_queued_replica():
    ordered = prefill_order([Candidate("a", 500), Candidate("b", 100), Candidate("c", 300)], 64, 16)
    assert [c.replica_id for c in ordered] == ["b", "c", "a"]


def test_prefill_prefers_a_cached_prefix_unless_it_is_swamped():
    warm = Candidate("warm", queued_prompt_tokens=200, cached_blocks=30)  # 480 of 512 prompt tokens cached
    cold = Candidate("cold", queued_prompt_tokens=0)
    assert prefill_order([cold, warm], 512, 16)[0].replica_id == "warm"
    swamped = Candidate("warm", queued_prompt_tokens=5000, cached_blocks=30)
    assert prefill_order([cold, swamped], 512, 16)[0].replica_id == "cold"


def test_decode_prefers_fewer_sequences_then_free_cache():
    ordered = decode_order([Candidate("a", ongoing=3, kv_usage=0.1), Candidate("b", ongoing=1, kv_usage=0.9),
                            Candidate("c", ongoing=1, kv_usage=0.2)])
    assert [c.replica_id for c in ordered] == ["c", "b", "a"]


def test_a_replica_whose_engine_failed_is_chosen_last_by_both_routers():
    # Idle because its engine failed: a retry sent there would fail again until Serve replaces it.
    failed = Candidate("failed", ongoing=0, healthy=False)
    busy = Candidate("busy", queued_prompt_tokens=900, ongoing=7, kv_usage=0.9)
    assert [c.replica_id for c in decode_order([failed, busy])] == ["busy", "failed"]
    assert [c.replica_id for c in prefill_order([failed, busy], 64, 16)] == ["busy", "failed"]


def test_matched_blocks_counts_the_leading_run_only():
    prompt = list(range(100, 164))
    hashes = prefix_hashes(prompt, 16)
    assert matched_blocks(hashes, [set(hashes[:2])]) == 2
    assert matched_blocks(hashes, [{hashes[0]}, {hashes[1], hashes[3]}]) == 2
    assert matched_blocks(hashes, [set(hashes[1:])]) == 0


def test_tracker_adds_and_releases_in_flight_work():
    tracker = _Tracker()
    tracker.add("r1", "a", 100, [1, 2])
    tracker.add("r2", "a", 50, [])
    assert tracker.tokens["a"] == 150 and tracker.requests["a"] == 2
    tracker.done("r1")
    tracker.done("r1")  # completion may be reported twice; the second is ignored
    assert tracker.tokens["a"] == 50 and tracker.requests["a"] == 1
    tracker.forget("a")
    assert "a" not in tracker.tokens and not tracker.inflight


def _replica(rid: str, **stats):
    return SimpleNamespace(replica_id=rid, routing_stats=stats)


def _pending(request_id: str, prompt: list[int]):
    return SimpleNamespace(args=[SimpleNamespace(prompt_token_ids=prompt)], kwargs={},
                           metadata=SimpleNamespace(internal_request_id=request_id),
                           routing_context=SimpleNamespace(should_backoff=False))


def _router(cls):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    router = cls(DeploymentID(name="pool", app_name="app"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    return router


@pytest.mark.parametrize("cls", [DecodeRouter, PrefillRouter])
def test_a_burst_spreads_before_any_replica_accepts(cls):
    """Serve reports acceptance an RPC after the choice; a burst chosen meanwhile must not pile onto one
    replica (all published stats still say idle)."""
    router = _router(cls)
    replicas = [_replica("a", block_size=16), _replica("b", block_size=16)]
    chosen = [asyncio.run(router.choose_replicas(replicas, _pending(f"r{i}", list(range(i, i + 40)))))[0][0]
              for i in range(8)]
    assert sorted(Counter(r.replica_id for r in chosen).values()) == [4, 4]
    # Acceptance moves the charge when Serve fell back to another replica; completion releases it.
    first, other = chosen[0].replica_id, "b" if chosen[0].replica_id == "a" else "a"
    router.on_request_routed(_pending("r0", list(range(40))), other, None)
    assert router._tracker.requests == {first: 3, other: 5}
    for i in range(8):
        router.on_request_completed(other if i == 0 else chosen[i].replica_id, f"r{i}")
    assert router._tracker.requests == {"a": 0, "b": 0}


def test_a_charge_made_when_choosing_lapses_unless_the_replica_accepts():
    """A request cancelled or refused before it is sent gets no completion callback: its tentative charge
    must not skew routing for ever, while an accepted request stays charged until it completes."""
    tracker = _Tracker()
    tracker.add("never-sent", "a", 10, [], lapses_at=100.0)
    tracker.add("accepted", "a", 20, [], lapses_at=100.0)
    tracker.add("accepted", "a", 20, [1])  # Serve reported it routed: a firm charge
    tracker.expire(99.0)
    assert tracker.requests["a"] == 2
    tracker.expire(100.0)
    assert tracker.requests["a"] == 1 and tracker.tokens["a"] == 20 and set(tracker.inflight) == {"accepted"}
