"""Checkpoint I/O: write the published layout, read it back lazily, and reject broken checkpoints early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import r1serve.runtime.model.checkpoint as checkpoint_module
from r1serve.runtime.model.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    layer_index,
    load_mtp_weights,
    load_weights,
    mtp_tensor_names,
    read_header,
    read_index,
)
from r1serve.runtime.model.checkpoint_writer import FP8_QUANTIZATION_CONFIG, save_checkpoint
from r1serve.runtime.model.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_blockwise

NUM_LAYERS = 2
HIDDEN, HEADS, VOCAB = 64, 2, 300
Q_LORA, KV_LORA, NOPE, ROPE, V_DIM = 32, 16, 16, 8, 16
INTERMEDIATE, MOE_INTERMEDIATE, EXPERTS = 160, 32, 4
SMALL_SHARDS = 48 * 1024  # forces several shards for these tiny tensors


def mlp(prefix: str, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (intermediate, HIDDEN),
        f"{prefix}up_proj.weight": (intermediate, HIDDEN),
        f"{prefix}down_proj.weight": (HIDDEN, intermediate),
    }


def layer(index: int, q_lora: bool) -> dict[str, tuple[int, ...]]:
    p, a = f"model.layers.{index}.", f"model.layers.{index}.self_attn."
    s = {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}
    if q_lora:
        s[a + "q_a_proj.weight"] = (Q_LORA, HIDDEN)
        s[a + "q_a_layernorm.weight"] = (Q_LORA,)
        s[a + "q_b_proj.weight"] = (HEADS * (NOPE + ROPE), Q_LORA)
    else:
        s[a + "q_proj.weight"] = (HEADS * (NOPE + ROPE), HIDDEN)
    s[a + "kv_a_proj_with_mqa.weight"] = (KV_LORA + ROPE, HIDDEN)
    s[a + "kv_a_layernorm.weight"] = (KV_LORA,)
    s[a + "kv_b_proj.weight"] = (HEADS * (NOPE + V_DIM), KV_LORA)
    s[a + "o_proj.weight"] = (HIDDEN, HEADS * V_DIM)
    if index == 0:  # first_k_dense_replace = 1
        return s | mlp(p + "mlp.", INTERMEDIATE)
    s[p + "mlp.gate.weight"] = (EXPERTS, HIDDEN)
    s[p + "mlp.gate.e_score_correction_bias"] = (EXPERTS,)
    for e in range(EXPERTS):
        s |= mlp(f"{p}mlp.experts.{e}.", MOE_INTERMEDIATE)
    return s | mlp(p + "mlp.shared_experts.", MOE_INTERMEDIATE)


def expected_shapes(q_lora: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(NUM_LAYERS):
        shapes |= layer(i, q_lora)
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def mtp_shapes() -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{NUM_LAYERS}."
    extra = {
        p + "enorm.weight": (HIDDEN,),
        p + "hnorm.weight": (HIDDEN,),
        p + "eh_proj.weight": (HIDDEN, 2 * HIDDEN),
        p + "shared_head.norm.weight": (HIDDEN,),
        p + "shared_head.head.weight": (VOCAB, HIDDEN),
    }
    return layer(NUM_LAYERS, q_lora=True) | extra


def random_tensors(shapes, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=gen) * 0.02).to(dtype) for name, shape in shapes.items()}


def tiny_config(q_lora: bool = True) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "n_shared_experts": 1,
        "n_routed_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "q_lora_rank": Q_LORA if q_lora else None,
        "kv_lora_rank": KV_LORA,
        "qk_nope_head_dim": NOPE,
        "qk_rope_head_dim": ROPE,
        "v_head_dim": V_DIM,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


def load_all(directory, expected=None, dtype=torch.float32, **kwargs) -> dict[str, torch.Tensor]:
    expected = expected_shapes() if expected is None else expected
    out = {}
    for name, tensor in load_weights(
        directory, expected, dtype, num_hidden_layers=NUM_LAYERS, progress=False, **kwargs
    ):
        assert name not in out, f"{name} yielded twice"
        out[name] = tensor
    return out


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(expected_shapes())
    out = save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "fp32", tensors, tiny_config(), max_shard_bytes=SMALL_SHARDS, tokenizer=False
    )
    return out, tensors


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = random_tensors(expected_shapes() | mtp_shapes(), torch.bfloat16, seed=1)
    out = save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "fp8", tensors, tiny_config(), fp8=True, max_shard_bytes=SMALL_SHARDS
    )
    return out, tensors


def copy_checkpoint(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in source.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- round trips -------------------------------------------------------------------------------------------


def test_writes_the_hub_layout(fp32_checkpoint):
    directory, tensors = fp32_checkpoint
    index = read_json(directory / INDEX_FILE)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    config = read_json(directory / "config.json")
    assert config["torch_dtype"] == config["dtype"] == "float32" and "quantization_config" not in config
    assert sorted(p.name for p in directory.iterdir()) == sorted(["config.json", INDEX_FILE, *shards])
    from safetensors import safe_open

    with safe_open(str(directory / shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_is_exact(fp32_checkpoint, dtype):
    directory, tensors = fp32_checkpoint
    loaded = load_all(directory, dtype=dtype)
    assert loaded.keys() == tensors.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype and tensor.is_contiguous() and tensor.device.type == "cpu", name
        assert torch.equal(tensor, tensors[name].to(dtype)), name


def test_round_trip_without_q_lora(tmp_path):
    shapes = expected_shapes(q_lora=False)
    assert "model.layers.0.self_attn.q_proj.weight" in shapes
    tensors = random_tensors(shapes, torch.bfloat16)
    save_checkpoint(tmp_path / "c", tensors, tiny_config(q_lora=False), max_shard_bytes=SMALL_SHARDS, tokenizer=False)
    assert read_json(tmp_path / "c" / "config.json")["torch_dtype"] == "bfloat16"
    loaded = load_all(tmp_path / "c", shapes, torch.bfloat16)
    assert all(torch.equal(loaded[n], tensors[n]) for n in shapes)


def test_single_file_checkpoint_without_index(tmp_path):
    tensors = random_tensors(expected_shapes())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = read_index(tmp_path)
    assert set(index.weight_map) == set(tensors) and index.shard_files == ("model.safetensors",)
    loaded = load_all(tmp_path)
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_fp8_checkpoint_round_trip(fp8_checkpoint):
    directory, tensors = fp8_checkpoint
    config = read_json(directory / "config.json")
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG and config["torch_dtype"] == "bfloat16"
    weight_map = read_json(directory / INDEX_FILE)["weight_map"]
    q_name = "model.layers.1.mlp.experts.2.down_proj.weight"
    for name in (q_name, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.gate_proj.weight"):
        assert name + "_scale_inv" in weight_map and weight_map[name + "_scale_inv"] == weight_map[name]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert name + "_scale_inv" not in weight_map
    assert "model.layers.1.mlp.gate.e_score_correction_bias_scale_inv" not in weight_map
    header = read_header(directory / weight_map[q_name])
    assert header[q_name].dtype == "F8_E4M3" and header[q_name + "_scale_inv"].shape == (1, 1)
    assert len(set(weight_map.values())) >= 3

    loaded = load_all(directory, dtype=torch.bfloat16)
    assert loaded.keys() == expected_shapes().keys()
    for name, tensor in loaded.items():
        original = tensors[name]
        if name + "_scale_inv" in weight_map:
            exact = dequantize_blockwise(*quantize_blockwise(original), torch.bfloat16)
            assert torch.equal(tensor, exact), name
            torch.testing.assert_close(tensor.float(), original.float(), rtol=0.07, atol=2e-3)
        else:
            assert torch.equal(tensor, original), name


def test_include_reads_only_what_it_accepts(fp32_checkpoint, monkeypatch):
    directory, tensors = fp32_checkpoint
    read: list[str] = []
    real_safe_open = checkpoint_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._f = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(checkpoint_module, "safe_open", Spy)
    mine = {0, 1}  # an expert-parallel rank owning experts 0 and 1

    def include(name: str) -> bool:
        parts = name.split(".")
        return "experts" not in parts or int(parts[parts.index("experts") + 1]) in mine

    loaded = load_all(directory, include=include)
    assert set(read) == set(loaded) == {n for n in tensors if include(n)}
    assert "model.layers.1.mlp.experts.3.up_proj.weight" not in loaded
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in loaded


def test_mtp_layers_are_skipped_but_loadable(fp8_checkpoint):
    directory, tensors = fp8_checkpoint
    loaded = load_all(directory, dtype=torch.bfloat16)
    assert not any(layer_index(n) == NUM_LAYERS for n in loaded)

    index = read_index(directory)
    names = mtp_tensor_names(index, NUM_LAYERS)
    assert set(names) == set(mtp_shapes())  # no *_scale_inv partners
    mtp = dict(load_mtp_weights(directory, torch.float32, num_hidden_layers=NUM_LAYERS, progress=False))
    assert mtp.keys() == mtp_shapes().keys()
    assert torch.equal(
        mtp[f"model.layers.{NUM_LAYERS}.enorm.weight"], tensors[f"model.layers.{NUM_LAYERS}.enorm.weight"].float()
    )
    q_name = f"model.layers.{NUM_LAYERS}.self_attn.o_proj.weight"
    torch.testing.assert_close(mtp[q_name], tensors[q_name].float(), rtol=0.07, atol=2e-3)
    only_norms = dict(
        load_mtp_weights(
            directory, torch.float32, num_hidden_layers=NUM_LAYERS, include=lambda n: "norm" in n, progress=False
        )
    )
    assert only_norms and all("norm" in n for n in only_norms)


def test_expected_mtp_names_are_loaded_normally(fp8_checkpoint):
    directory, _ = fp8_checkpoint
    expected = expected_shapes() | mtp_shapes()
    assert load_all(directory, expected, torch.bfloat16).keys() == expected.keys()


# --- validation --------------------------------------------------------------------------------------------


def test_missing_shard_file(fp32_checkpoint, tmp_path):
    directory = copy_checkpoint(fp32_checkpoint[0], tmp_path / "c")
    weight_map = read_json(directory / INDEX_FILE)["weight_map"]
    victim = sorted(set(weight_map.values()))[1]
    (directory / victim).unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        load_weights(directory, expected_shapes(), torch.float32, num_hidden_layers=NUM_LAYERS)
    assert victim in str(info.value)
    assert info.value.tensor in weight_map and weight_map[info.value.tensor] == victim


def test_index_names_a_tensor_its_shard_lacks(fp32_checkpoint, tmp_path):
    directory = copy_checkpoint(fp32_checkpoint[0], tmp_path / "c")
    index = read_json(directory / INDEX_FILE)
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="header does not") as info:
        load_all(directory)
    assert name in str(info.value) and wrong in str(info.value)


def test_wrong_shape(fp32_checkpoint):
    expected = expected_shapes()
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    expected[name] = (48, 17)
    with pytest.raises(CheckpointError) as info:
        load_all(fp32_checkpoint[0], expected)
    message = str(info.value)
    assert name in message and "[48, 17]" in message and str(list(expected_shapes()[name])) in message
    assert "model-0000" in message


def test_missing_expected_tensor(fp32_checkpoint):
    name = "model.layers.1.mlp.experts.4.gate_proj.weight"
    expected = expected_shapes() | {name: (MOE_INTERMEDIATE, HIDDEN)}
    with pytest.raises(CheckpointError, match="does not list it") as info:
        load_all(fp32_checkpoint[0], expected)
    assert name in str(info.value) and INDEX_FILE in str(info.value)


def test_unexpected_tensor(fp32_checkpoint):
    expected = expected_shapes()
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    del expected[name]
    with pytest.raises(CheckpointError, match="unexpected tensor") as info:
        load_all(fp32_checkpoint[0], expected)
    assert name in str(info.value) and "model-0000" in str(info.value)


def test_truncated_shard_fails_before_anything_is_yielded(fp32_checkpoint, tmp_path):
    directory = copy_checkpoint(fp32_checkpoint[0], tmp_path / "c")
    victim = sorted(read_index(directory).shard_files)[-1]
    data = (directory / victim).read_bytes()
    (directory / victim).write_bytes(data[: len(data) // 2])
    # The error comes from the call itself: no tensor has been handed out yet.
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_weights(directory, expected_shapes(), torch.float32, num_hidden_layers=NUM_LAYERS)
    assert victim in str(info.value)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 3, b"\xff" * 64, (20).to_bytes(8, "little") + b"not json at all!!!!!"],
    ids=["short", "length", "json"],
)
def test_corrupt_header(fp32_checkpoint, tmp_path, garbage):
    directory = copy_checkpoint(fp32_checkpoint[0], tmp_path / "c")
    victim = read_index(directory).shard_files[0]
    (directory / victim).write_bytes(garbage)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_all(directory)
    assert victim in str(info.value)


def test_missing_scale_in_fp8_checkpoint(fp8_checkpoint, tmp_path):
    directory = copy_checkpoint(fp8_checkpoint[0], tmp_path / "c")
    name = "model.layers.1.self_attn.o_proj.weight"
    index = read_json(directory / INDEX_FILE)
    shard = index["weight_map"].pop(name + "_scale_inv")
    tensors = load_file(str(directory / shard))
    del tensors[name + "_scale_inv"]
    save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    (directory / INDEX_FILE).write_text(json.dumps(index))
    assert tensors[name].dtype == FP8_DTYPE
    with pytest.raises(CheckpointError, match="multiplier") as info:
        load_all(directory, dtype=torch.bfloat16)
    assert name in str(info.value) and shard in str(info.value)


def test_wrong_scale_shape_in_fp8_checkpoint(fp8_checkpoint, tmp_path):
    directory = copy_checkpoint(fp8_checkpoint[0], tmp_path / "c")
    scale = "model.layers.0.mlp.gate_proj.weight_scale_inv"  # [160, 64] -> [2, 1]
    shard = read_json(directory / INDEX_FILE)["weight_map"][scale]
    tensors = load_file(str(directory / shard))
    tensors[scale] = torch.ones(1, 1)
    save_file(tensors, str(directory / shard))
    with pytest.raises(CheckpointError, match=r"expected \[2, 1\]") as info:
        load_all(directory, dtype=torch.bfloat16)
    assert scale in str(info.value) and shard in str(info.value)


def test_scale_in_another_shard(fp8_checkpoint, tmp_path):
    directory = copy_checkpoint(fp8_checkpoint[0], tmp_path / "c")
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    scale = name + "_scale_inv"
    index = read_json(directory / INDEX_FILE)
    source = index["weight_map"][scale]
    target = next(s for s in sorted(set(index["weight_map"].values())) if s != source)
    source_tensors, target_tensors = load_file(str(directory / source)), load_file(str(directory / target))
    target_tensors[scale] = source_tensors.pop(scale)
    save_file(source_tensors, str(directory / source))
    save_file(target_tensors, str(directory / target))
    index["weight_map"][scale] = target
    (directory / INDEX_FILE).write_text(json.dumps(index))
    loaded = load_all(directory, dtype=torch.float32)
    expected = dequantize_blockwise(source_tensors[name], target_tensors[scale], torch.float32)
    assert torch.equal(loaded[name], expected)


def handmade_shard(path: Path, entry: dict, data: bytes) -> None:
    header = json.dumps({"w": entry}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    ("entry", "data", "match"),
    [
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}, b"xx", "malformed"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, b"xxxx", "do not fit F32"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, b"xxxx", "truncated"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, b"x" * 8, "malformed"),
    ],
    ids=["dtype", "size", "truncated", "shape"],
)
def test_bad_header_entries(tmp_path, entry, data, match):
    handmade_shard(tmp_path / "model.safetensors", entry, data)
    with pytest.raises(CheckpointError, match=match) as info:
        read_index(tmp_path)
    assert info.value.tensor == "w" and "model.safetensors" in str(info.value)


def test_progress_bar_does_not_get_in_the_way(fp32_checkpoint):
    directory, tensors = fp32_checkpoint
    names = [n for n, _ in load_weights(directory, expected_shapes(), torch.float32, num_hidden_layers=NUM_LAYERS)]
    assert sorted(names) == sorted(tensors)


def test_no_index_and_no_single_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        read_index(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and INDEX_FILE in message and "model.safetensors" in message


def test_corrupt_index(fp32_checkpoint, tmp_path):
    directory = copy_checkpoint(fp32_checkpoint[0], tmp_path / "c")
    (directory / INDEX_FILE).write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=INDEX_FILE.replace(".", r"\.")):
        read_index(directory)


def test_index_cannot_point_outside_the_checkpoint(fp32_checkpoint, tmp_path):
    directory = copy_checkpoint(fp32_checkpoint[0], tmp_path / "c")
    index = read_json(directory / INDEX_FILE)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        read_index(directory)


# --- writing -----------------------------------------------------------------------------------------------


def test_non_empty_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    tensors = random_tensors(expected_shapes())
    with pytest.raises(CheckpointError, match="overwrite") as info:
        save_checkpoint(out, tensors, tiny_config(), tokenizer=False)
    assert str(out) in str(info.value) and (out / "keep.txt").read_text() == "precious"
    save_checkpoint(out, tensors, tiny_config(), tokenizer=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / INDEX_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary or old siblings left


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import r1serve.runtime.model.checkpoint_writer as writer

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save_file(*args, **kwargs)

    monkeypatch.setattr(writer, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c", random_tensors(expected_shapes()), tiny_config(), max_shard_bytes=SMALL_SHARDS)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_files_are_copied(fp8_checkpoint):
    directory, _ = fp8_checkpoint
    tokenizer_config = read_json(directory / "tokenizer_config.json")
    assert "chat_template" in tokenizer_config
    assert read_json(directory / "tokenizer.json")["model"]["type"] == "BPE"


def test_transformers_reads_the_written_checkpoint(fp32_checkpoint):
    transformers = pytest.importorskip("transformers")
    directory, tensors = fp32_checkpoint
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    torch.testing.assert_close(state["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    torch.testing.assert_close(
        state["model.layers.1.self_attn.kv_b_proj.weight"], tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    )
