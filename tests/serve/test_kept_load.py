"""A replica's side of the kept expert load, without Ray: where it is read and written, whole files only, and
load of another model ignored (the replica then starts uniform)."""

from __future__ import annotations

import logging
import time

from r1serve.runtime.serve import kept_load
from r1serve.runtime.serve.checkpoint import CACHE_ENV
from r1serve.runtime.serve.status_board import StatusBoard, format_status, pool_status
from r1serve.spec import expert_load as E


def test_the_mounted_configmap_is_read_where_the_pod_has_it_else_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    mount = tmp_path / "mount"
    assert kept_load.kept_load_path("r1", "decode", mount) == tmp_path / "cache" / "expert-load" / "r1" / "decode.json"
    mount.mkdir()  # an optional ConfigMap volume is mounted (empty) even before the ConfigMap exists
    assert kept_load.kept_load_path("r1", "decode", mount) == mount / "decode.json"


def test_the_local_file_is_written_whole_and_read_back(tmp_path):
    path = tmp_path / "expert-load" / "r1" / "decode.json"
    kept_load.keep_locally(path, {1: [5, 0, 10], 2: [1, 1, 1]})
    kept_load.keep_locally(path, {1: [10, 0, 5], 2: [1, 1, 1]})
    assert [p.name for p in path.parent.iterdir()] == ["decode.json"]  # no temporary left behind
    load = kept_load.read_kept_load(path, num_experts=3, layers=[1, 2])
    assert load == {1: [65535.0, 0.0, 32768.0], 2: [65535.0] * 3}
    assert kept_load.read_kept_load(tmp_path / "none.json", num_experts=3, layers=[1, 2]) is None


def test_load_kept_for_another_model_is_ignored_and_said(tmp_path, caplog):
    path = tmp_path / "decode.json"
    path.write_text(E.encode({1: [1, 2, 3, 4]}))
    with caplog.at_level(logging.WARNING):
        assert kept_load.read_kept_load(path, num_experts=3, layers=[1, 2]) is None
    assert "layer 1: 4 experts, the model has 3" in caplog.text


def test_only_load_from_enough_tokens_is_worth_keeping():
    assert not kept_load.worth_keeping({1: [10, 20]})
    assert kept_load.worth_keeping({1: [100, 200]})


def test_the_board_merges_the_replicas_loads_for_the_operator():
    board = StatusBoard()
    now = time.time()
    board.record_expert_load("decode", "a", E.encode({1: [1, 0]}), now)
    board.record_expert_load("decode", "b", E.encode({1: [0, 1]}), now - 1)
    board.record_expert_load("decode", "gone", E.encode({1: [9, 0]}), now - 3600)
    status = pool_status(board.get(), {"decode": 2})
    kept = status["pools"]["decode"]["expertLoad"]
    assert (kept["replicas"], kept["at"]) == (2, now)
    assert E.decode(kept["load"]) == {1: [65535.0, 65535.0]}
    assert "expert load: reported by 2 replica(s)" in format_status(status)
