"""Fuzzed corrupt checkpoints: a damaged header or a cut file is always a CheckpointError naming the file."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1serve.runtime.model.checkpoint import CheckpointError, load_weights
from r1serve.runtime.model.checkpoint_writer import save_checkpoint
from r1serve.runtime.model.tiny import random_weights, tiny_config
from r1serve.runtime.model.weights import checkpoint_shapes

CONFIG = tiny_config({"vocab_size": 256, "num_nextn_predict_layers": 0})
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    save_checkpoint(out, random_weights(CONFIG, seed=2), CONFIG.to_dict(), max_shard_bytes=200_000, tokenizer=False)
    return out


def _load_all(path) -> None:
    for _ in load_weights(path, checkpoint_shapes(CONFIG), torch.float32, num_hidden_layers=CONFIG.num_hidden_layers,
                          progress=False):
        pass


def _copy(pristine, tmp_path_factory):
    target = tmp_path_factory.mktemp("case") / "ckpt"
    shutil.copytree(pristine, target)
    shard = sorted(target.glob("*.safetensors"))[0]
    return target, shard


@SETTINGS
@given(data=st.data())
def test_damaged_headers_are_named_errors(pristine, tmp_path_factory, data):
    target, shard = _copy(pristine, tmp_path_factory)
    raw = bytearray(shard.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    position = data.draw(st.integers(0, 8 + header_len - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != raw[position]))
    raw[position] = value
    shard.write_bytes(bytes(raw))
    try:
        _load_all(target)
    except CheckpointError as exc:
        assert shard.name in str(exc) or "model.safetensors.index.json" in str(exc)
    # A flip inside a JSON string's digits can still leave a valid, consistent header (e.g. another
    # offset of equal length): then loading may succeed, and that is fine; anything else must not escape.


@SETTINGS
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_shards_are_named_errors(pristine, tmp_path_factory, fraction):
    target, shard = _copy(pristine, tmp_path_factory)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(CheckpointError, match=shard.name):
        _load_all(target)


@SETTINGS
@given(garbage=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_garbage_index_files_are_named_errors(pristine, tmp_path_factory, garbage):
    target, _ = _copy(pristine, tmp_path_factory)
    index = target / "model.safetensors.index.json"
    if isinstance(garbage, str):
        try:
            json.loads(garbage)
            if isinstance(json.loads(garbage), dict) and "weight_map" in json.loads(garbage):
                return
        except ValueError:
            pass
        index.write_text(garbage)
    else:
        index.write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        _load_all(target)
