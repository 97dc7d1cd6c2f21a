"""The scaling status board and its `r1serve status` rendering, without Ray."""

from __future__ import annotations

import time

from r1serve.runtime.serve.scaling import Bounds, prefill_decision
from r1serve.runtime.serve.status_board import (
    StatusBoard,
    format_status,
    pool_status,
    publish,
    publish_drafts,
    publish_engine,
    publish_ranks,
)


def test_the_board_keeps_the_last_decision_and_the_last_change():
    board = StatusBoard()
    up = prefill_decision(1, 5000, 1000, Bounds(1, 8)).to_dict()
    hold = prefill_decision(5, 5000, 1000, Bounds(1, 8)).to_dict()
    board.record(up, 100.0)
    assert "lastScaleDecision" not in board.get()["prefill"]  # a wish until the count changes
    board.record(hold, 110.0)
    pools = board.get()
    assert pools["prefill"]["last"]["desired"] == 5 and pools["prefill"]["last"]["at"] == 110.0
    assert pools["prefill"]["lastScaleDecision"] == {**up, "at": 100.0}
    blip = prefill_decision(5, 50000, 1000, Bounds(1, 8)).to_dict()  # wants 8, then the load falls back
    board.record(blip, 120.0)
    board.record(hold, 130.0)
    assert board.get()["prefill"]["lastScaleDecision"] == {**up, "at": 100.0}


def test_status_shows_current_and_desired_replicas_with_the_reason():
    board = StatusBoard()
    board.record(prefill_decision(1, 5000, 1000, Bounds(1, 8)).to_dict(), 0.0)
    board.record(prefill_decision(1, 5000, 1000, Bounds(1, 8)).to_dict(), 1.0)
    status = pool_status(board.get(), {"prefill": 1, "decode": 2})
    assert status["pools"]["prefill"]["currentReplicas"] == 1
    assert status["pools"]["prefill"]["desiredReplicas"] == 5
    assert status["pools"]["decode"] == {"currentReplicas": 2, "desiredReplicas": None, "lastDecision": None,
                                         "lastScaleDecision": None, "engine": None, "degradedReplicas": [],
                                         "expertLoad": None, "speculative": None}
    text = format_status(status)
    assert "prefill: 1 replicas, desired 5" in text
    assert "queued prompt tokens 5000 in the pool vs target 1000 per replica" in text
    assert "decode: 2 replicas, no decision yet" in text


def test_publishing_without_ray_never_fails_the_policy():
    publish(prefill_decision(1, 0, 1000, Bounds(1, 8)))  # no Ray running: silently skipped


def test_status_shows_how_each_pools_engine_runs():
    board = StatusBoard()
    graphs = "12 graphs, batch 1-256, 850 MiB"
    board.record_engine("decode", {"device": "cuda:0", "kernels": "triton", "cudaGraphs": graphs})
    board.record_engine("prefill", {"device": "cuda:0", "kernels": "triton", "cudaGraphs": "off", "ranks": "8"})
    status = pool_status(board.get(), {"prefill": 1, "decode": 1})
    assert status["pools"]["decode"]["engine"]["kernels"] == "triton"
    text = format_status(status)
    assert "  engine: on cuda:0, kernels triton, CUDA graphs 12 graphs, batch 1-256, 850 MiB" in text
    assert "  engine: on cuda:0, kernels triton, CUDA graphs off, 8 expert-parallel ranks" in text
    publish_engine("decode", {"kernels": "torch"})  # no Ray running: silently skipped


def test_status_names_replicas_serving_with_fewer_ranks_until_they_stop_saying_so():
    board = StatusBoard()
    now = time.time()
    board.record_ranks("decode", "r-new", 3, 4, now)
    board.record_ranks("decode", "r-gone", 2, 4, now - 3600)  # a replaced replica refreshes nothing
    status = pool_status(board.get(), {"decode": 2})
    assert status["pools"]["decode"]["degradedReplicas"] == [{"replica": "r-new", "ranksAlive": 3, "ranks": 4}]
    assert "  degraded: replica r-new serves with 3 of 4 expert-parallel ranks" in format_status(status)
    board.record_ranks("decode", "r-new", 4, 4, now + 1)  # it grew back
    assert pool_status(board.get(), {"decode": 2})["pools"]["decode"]["degradedReplicas"] == []
    publish_ranks("decode", "r-new", 3, 4)  # no Ray running: silently skipped


def test_status_shows_how_many_draft_tokens_the_pools_replicas_kept():
    board = StatusBoard()
    board.record_engine("decode", {"device": "cpu", "kernels": "torch", "cudaGraphs": "off",
                                   "speculative": "mtp (1 draft token)"})
    assert pool_status(board.get(), {"decode": 1})["pools"]["decode"]["speculative"] is None
    board.record_drafts("decode", "r1", 100, 80, time.time())
    board.record_drafts("decode", "r2", 50, 10, time.time())
    board.record_drafts("decode", "r1", 200, 170, time.time())  # its counts since it started, grown
    status = pool_status(board.get(), {"decode": 2})
    assert status["pools"]["decode"]["speculative"] == {
        "draftTokens": 250, "keptTokens": 180, "replicas": 2, "acceptanceByPosition": {"1": 0.72}}
    text = format_status(status)
    assert "speculative mtp (1 draft token)" in text
    assert "  speculative decoding: 180 of 250 draft tokens kept (72% at draft position 1), over 2 replica(s)" in text
    publish_drafts("decode", "r1", 1, 1)  # no Ray running: silently skipped
