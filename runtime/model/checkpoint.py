"""Reads the published Hugging Face checkpoint layout: validates every header first, then streams tensors."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from .errors import CheckpointError
from .fp8 import DEFAULT_BLOCK, Fp8Weight, dequantize_blockwise, scale_shape

__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointError",
    "CheckpointIndex",
    "TensorInfo",
    "layer_index",
    "load_mtp_weights",
    "load_weights",
    "mtp_tensor_names",
    "read_header",
    "read_index",
    "scale_name_of",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE_NAME = "F8_E4M3"

# safetensors refuses headers above 100 MB; a bigger length prefix means garbage, not a huge header.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``offsets`` are relative to the data section."""

    dtype: str
    shape: Shape
    offsets: tuple[int, int]


@dataclass(frozen=True)
class CheckpointIndex:
    """Which shard holds each tensor. ``source`` is the file that said so (the index, or the single file)."""

    directory: Path
    weight_map: Mapping[str, str]
    source: Path
    metadata: Mapping[str, Any]

    @property
    def shard_files(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.weight_map.values())))

    def path_of(self, name: str) -> Path:
        return self.directory / self.weight_map[name]


def scale_name_of(name: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``, the name of an FP8 weight's dequantization multiplier."""
    return name + SCALE_SUFFIX


def layer_index(name: str) -> int | None:
    """The decoder-layer number in ``model.layers.L.…``, else None."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def read_index(checkpoint_dir: str | Path) -> CheckpointIndex:
    """Parse the shard index (or a lone model.safetensors) and check that every shard file exists."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise CheckpointError("checkpoint directory does not exist", file=directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        metadata, weight_map = _parse_index_file(index_path)
        for shard, names in itertools.groupby(sorted(weight_map.items(), key=lambda kv: kv[1]), key=lambda kv: kv[1]):
            if not (directory / shard).is_file():
                raise CheckpointError(
                    f"shard file listed in {INDEX_FILE} is missing (it should hold this tensor)",
                    file=directory / shard,
                    tensor=next(names)[0],
                )
        return CheckpointIndex(directory, weight_map, index_path, metadata)
    single = directory / SINGLE_FILE
    if single.is_file():
        return CheckpointIndex(directory, {name: SINGLE_FILE for name in read_header(single)}, single, {})
    raise CheckpointError(f"neither {INDEX_FILE} nor {SINGLE_FILE} found", file=directory)


def _parse_index_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse the shard index: {e}", file=path) from e
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError("the shard index has no 'weight_map' object", file=path)
    for name, shard in data["weight_map"].items():
        # A shard must be a plain file name inside the checkpoint, never a path that leaves it.
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(f"weight_map gives {shard!r}, not a shard file name", file=path, tensor=name)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return metadata, dict(data["weight_map"])


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data; detects truncated and corrupt files."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"only {size} bytes, shorter than a header: corrupt or truncated", file=path)
            length = int.from_bytes(prefix, "little")
            if length > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"header length field ({length}) does not fit the file ({size} bytes): "
                    "not a safetensors file, or corrupt",
                    file=path,
                )
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"cannot read the shard: {e}", file=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"the safetensors header is not valid JSON ({e}): corrupt file", file=path) from e
    if not isinstance(header, dict):
        raise CheckpointError("the safetensors header is not a JSON object: corrupt file", file=path)
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    return {name: _parse_entry(path, name, entry, data_bytes) for name, entry in header.items()}


def _parse_entry(path: Path, name: str, entry: Any, data_bytes: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _DTYPE_BYTES or not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
            raise ValueError(entry)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"malformed header entry {e}", file=path, tensor=name) from e
    if end > data_bytes:
        raise CheckpointError(
            f"data ends at byte {end} of the data section but the file holds only {data_bytes}: truncated file",
            file=path,
            tensor=name,
        )
    if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype] or begin > end:
        raise CheckpointError(f"data offsets {begin}..{end} do not fit {dtype} {list(shape)}", file=path, tensor=name)
    return TensorInfo(dtype, shape, (begin, end))


def load_weights(
    checkpoint_dir: str | Path,
    expected: Mapping[str, Shape],
    dtype: torch.dtype,
    *,
    include: Callable[[str], bool] | None = None,
    num_hidden_layers: int,
    progress: bool = True,
    cast: bool = True,
    keep_fp8: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Tensor | Fp8Weight]]:
    """Yield (name, contiguous CPU tensor in ``dtype``) for each expected name that ``include`` accepts.

    With ``cast=False`` unquantized tensors come as stored: a caller that copies them into preallocated
    parameters converts on the fly and avoids a second full-size temporary. FP8 weights are always
    dequantized into ``dtype`` (rounding once).

    The whole checkpoint is validated against ``expected`` before the first tensor is yielded (so a
    broken checkpoint fails before any weight is loaded). Tensors come in shard order, read one at a
    time; FP8 weights are dequantized with their scale. MTP layers (index >= num_hidden_layers) that
    ``expected`` does not name are skipped; see ``load_mtp_weights``. An FP8 weight that ``keep_fp8`` accepts
    comes as stored instead, an ``Fp8Weight`` with its multipliers (128x128 blocks only).
    """
    index = read_index(checkpoint_dir)
    _check_names(index, expected, num_hidden_layers)
    infos = _read_infos(index, index.shard_files)
    block = _block_size(index.directory)
    for name, shape in expected.items():
        _check_tensor(index, infos, name, tuple(shape), block)
    wanted = [name for name in expected if include is None or include(name)]
    if keep_fp8 is not None and block != DEFAULT_BLOCK and any(keep_fp8(name) for name in wanted):
        raise CheckpointError(f"FP8 weights are kept as FP8 only in {list(DEFAULT_BLOCK)} blocks; this checkpoint's "
                              f"weight_block_size is {list(block)}: load it dequantized",
                              file=index.directory / CONFIG_FILE)
    return _stream(index, infos, wanted, dtype, block, progress, cast, keep_fp8)


def mtp_tensor_names(index: CheckpointIndex, num_hidden_layers: int) -> list[str]:
    """Tensors of the multi-token-prediction layers (index >= num_hidden_layers), without FP8 scales."""

    def is_mtp(name: str) -> bool:
        layer = layer_index(name)
        return layer is not None and layer >= num_hidden_layers

    def is_scale(name: str) -> bool:
        return name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in index.weight_map

    return [name for name in index.weight_map if is_mtp(name) and not is_scale(name)]


def load_mtp_weights(
    checkpoint_dir: str | Path,
    dtype: torch.dtype,
    *,
    num_hidden_layers: int,
    include: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, Tensor]]:
    """Yield the MTP module's tensors (for speculative decoding), validated and dequantized like load_weights."""
    index = read_index(checkpoint_dir)
    names = [n for n in mtp_tensor_names(index, num_hidden_layers) if include is None or include(n)]
    shards = {index.weight_map[n] for n in names}
    shards |= {index.weight_map[scale_name_of(n)] for n in names if scale_name_of(n) in index.weight_map}
    infos = _read_infos(index, sorted(shards))
    block = _block_size(index.directory)
    for name in names:
        _check_tensor(index, infos, name, infos[name].shape, block)
    return _stream(index, infos, names, dtype, block, progress)


def _check_names(index: CheckpointIndex, expected: Mapping[str, Shape], num_hidden_layers: int) -> None:
    missing = [name for name in expected if name not in index.weight_map]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"the model expects this tensor but the checkpoint does not list it{more}",
            file=index.source,
            tensor=missing[0],
        )
    unexpected = [name for name in index.weight_map if not _is_accounted_for(name, index, expected, num_hidden_layers)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"unexpected tensor{more}: the model has no such parameter; does config.json describe "
            "the architecture this checkpoint was saved from?",
            file=index.path_of(unexpected[0]),
            tensor=unexpected[0],
        )


def _is_accounted_for(name: str, index: CheckpointIndex, expected: Mapping[str, Shape], num_layers: int) -> bool:
    if name in expected:
        return True
    layer = layer_index(name)
    if layer is not None and layer >= num_layers:
        return True  # the MTP module, kept for speculative decoding
    return name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in index.weight_map


def _read_infos(index: CheckpointIndex, shards: Any) -> dict[str, TensorInfo]:
    """Headers of ``shards``, checked against the index: each listed tensor must be in its named shard."""
    listed: dict[str, list[str]] = {}
    for name, shard in index.weight_map.items():
        listed.setdefault(shard, []).append(name)
    infos: dict[str, TensorInfo] = {}
    for shard in shards:
        path = index.directory / shard
        header = read_header(path)
        for name in listed.get(shard, []):
            if name not in header:
                raise CheckpointError(
                    f"{index.source.name} says this shard holds the tensor, but its header does not",
                    file=path,
                    tensor=name,
                )
            infos[name] = header[name]
    return infos


def _check_tensor(
    index: CheckpointIndex, infos: Mapping[str, TensorInfo], name: str, shape: Shape, block: tuple[int, int]
) -> None:
    info, path = infos[name], index.path_of(name)
    if info.shape != shape:
        raise CheckpointError(
            f"the model expects shape {list(shape)} but the checkpoint holds {list(info.shape)}", file=path, tensor=name
        )
    if info.dtype != FP8_DTYPE_NAME:
        return
    scale = scale_name_of(name)
    if len(shape) != 2:
        raise CheckpointError(
            f"FP8 tensor of shape {list(shape)}; only 2-D weights can be block-scaled", file=path, tensor=name
        )
    if scale not in infos:
        raise CheckpointError(f"FP8 weight without its {scale!r} multiplier", file=path, tensor=name)
    want = scale_shape(shape, block)
    if infos[scale].shape != want:
        raise CheckpointError(
            f"scale shape {list(infos[scale].shape)} does not fit weight {list(shape)} with blocks {list(block)}: "
            f"expected {list(want)}",
            file=index.path_of(scale),
            tensor=scale,
        )


def is_fp8_checkpoint(directory: str | Path) -> bool:
    """Whether config.json says the weights are FP8 (DeepSeek-V3/R1's quantization_config)."""
    path = Path(directory) / CONFIG_FILE
    try:
        quant = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read quantization_config: {e}", file=path) from e
    return isinstance(quant, dict) and quant.get("quant_method") == "fp8"


def _block_size(directory: Path) -> tuple[int, int]:
    """FP8 block shape from config.json's quantization_config (DeepSeek-V3 uses 128x128)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return DEFAULT_BLOCK
    try:
        quant = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
        block = quant.get("weight_block_size", DEFAULT_BLOCK)
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise ValueError(f"weight_block_size {block!r} is not two positive integers")
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"cannot read quantization_config: {e}", file=path) from e
    return (block[0], block[1])


def _stream(
    index: CheckpointIndex,
    infos: Mapping[str, TensorInfo],
    names: list[str],
    dtype: torch.dtype,
    block: tuple[int, int],
    progress: bool,
    cast: bool = True,
    keep_fp8: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Tensor | Fp8Weight]]:
    # Reading shard by shard, in file order, turns the reads into one sequential pass over each file.
    ordered = sorted(names, key=lambda n: (index.weight_map[n], infos[n].offsets))
    bar = tqdm(total=len(ordered), desc="Loading weights", unit="tensor", disable=None if progress else True)
    with bar:
        for shard, group in itertools.groupby(ordered, key=lambda n: index.weight_map[n]):
            path = index.directory / shard
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot open the shard: {e}", file=path) from e
            with handle as f:
                for name in group:
                    keep = keep_fp8 is not None and keep_fp8(name)
                    yield name, _read_tensor(index, f, name, infos[name], dtype, block, cast, keep)
                    bar.update()


def _read_tensor(
    index: CheckpointIndex,
    f: Any,
    name: str,
    info: TensorInfo,
    dtype: torch.dtype,
    block: tuple[int, int],
    cast: bool = True,
    keep_fp8: bool = False,
) -> Tensor | Fp8Weight:
    path = index.path_of(name)
    try:
        tensor = f.get_tensor(name)
        if info.dtype == FP8_DTYPE_NAME:
            scale = scale_name_of(name)
            scale_path = index.path_of(scale)
            if scale_path == path:
                scale_inv = f.get_tensor(scale)
            else:
                with safe_open(str(scale_path), framework="pt", device="cpu") as other:
                    scale_inv = other.get_tensor(scale)
            if keep_fp8:
                return Fp8Weight(tensor.contiguous(), scale_inv.to(torch.float32).contiguous())
            return dequantize_blockwise(tensor, scale_inv, dtype, block).contiguous()
        return tensor.to(dtype).contiguous() if cast else tensor
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the tensor: {e}", file=path, tensor=name) from e
