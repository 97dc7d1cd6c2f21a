"""The model's architecture, read from a Hugging Face `config.json` (DeepseekV3Config fields)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a model this runtime can run."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension as DeepSeek-V3 configures it (`rope_scaling` in config.json)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture fact the runtime needs; validated once, then passed around frozen."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    num_nextn_predict_layers: int = 0
    fp8_block_size: tuple[int, int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed KV plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d) corrected by YaRN's mscale, which DeepSeek applies to the logits, squared."""
        scale = self.qk_head_dim**-0.5
        yarn = self.rope_scaling
        if yarn is not None and yarn.mscale_all_dim:
            m = yarn_mscale(yarn.factor, yarn.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def expert_layers(self, mtp: bool) -> list[int]:
        """The layers whose routed experts expert parallelism places: the MoE layers, and with `mtp` the MTP
        layer (layer `num_hidden_layers`), where the checkpoint has one."""
        extra = [self.num_hidden_layers] if mtp and self.num_nextn_predict_layers > 0 else []
        return self.moe_layers + extra

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _parse(data)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        try:
            return _parse(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The published config.json form (rope_theta + rope_scaling, as the hub checkpoints have it)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("raw", "fp8_block_size")}
        out["rope_scaling"] = _rope_scaling_dict(self.rope_scaling)
        out.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            hidden_act="silu",
            num_key_value_heads=self.num_attention_heads,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
        )
        return dict(sorted(out.items()))

    def replace(self, **changes: Any) -> ModelConfig:
        data = self.to_dict()
        data.update(changes)
        return _parse(data)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_scaling_dict(rope: RopeScaling | None) -> dict[str, Any] | None:
    if rope is None:
        return None
    out = {"type": "yarn", **dataclasses.asdict(rope)}
    if out["attention_factor"] is None:
        del out["attention_factor"]
    return out


_REQUIRED_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
)


def _parse(data: dict[str, Any]) -> ModelConfig:
    missing = [k for k in _REQUIRED_INTS if data.get(k) is None]
    if missing:
        raise ConfigError(f"missing required field(s): {', '.join(missing)}")
    for key in _REQUIRED_INTS:
        _positive_int(data, key)
    model_type = data.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"model_type: expected 'deepseek_v3', got {model_type!r}")
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act: only 'silu' is supported, got {data['hidden_act']!r}")
    if data.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"scoring_func: only 'sigmoid' (DeepSeek-V3) is supported, got {data['scoring_func']!r}")
    heads = data["num_attention_heads"]
    if data.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"num_key_value_heads: MLA needs it equal to num_attention_heads ({heads})")
    if data["qk_rope_head_dim"] % 2:
        raise ConfigError(f"qk_rope_head_dim: must be even, got {data['qk_rope_head_dim']}")
    theta, scaling = _parse_rope(data)
    config = ModelConfig(
        **{k: int(data[k]) for k in _REQUIRED_INTS},
        n_shared_experts=_nonneg_int(data, "n_shared_experts", 0),
        n_group=_positive_int(data, "n_group", 1),
        topk_group=_positive_int(data, "topk_group", 1),
        first_k_dense_replace=_nonneg_int(data, "first_k_dense_replace", 0),
        routed_scaling_factor=float(data.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(data.get("norm_topk_prob", True)),
        q_lora_rank=None if data.get("q_lora_rank") is None else _positive_int(data, "q_lora_rank"),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_interleave=bool(data.get("rope_interleave", True)),
        attention_bias=bool(data.get("attention_bias", False)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        bos_token_id=_optional_token(data, "bos_token_id"),
        eos_token_id=_optional_token(data, "eos_token_id"),
        num_nextn_predict_layers=_nonneg_int(data, "num_nextn_predict_layers", 0),
        fp8_block_size=_parse_quantization(data.get("quantization_config")),
        raw=dict(data),
    )
    _check_routing(config)
    return config


def _check_routing(c: ModelConfig) -> None:
    if c.n_routed_experts % c.n_group:
        raise ConfigError(f"n_group: {c.n_group} does not divide n_routed_experts ({c.n_routed_experts})")
    if c.topk_group > c.n_group:
        raise ConfigError(f"topk_group: {c.topk_group} exceeds n_group ({c.n_group})")
    selectable = c.topk_group * (c.n_routed_experts // c.n_group)
    if c.num_experts_per_tok > selectable:
        raise ConfigError(
            f"num_experts_per_tok: {c.num_experts_per_tok} exceeds the {selectable} experts "
            f"reachable in topk_group={c.topk_group} groups"
        )
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise ConfigError(
            f"first_k_dense_replace: {c.first_k_dense_replace} exceeds num_hidden_layers ({c.num_hidden_layers})"
        )


def _parse_rope(data: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters`; the published checkpoints write rope_theta + rope_scaling.
    params = data.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    scaling = data.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"rope_scaling.type: only 'yarn' is supported, got {kind!r}")
    try:
        rope = RopeScaling(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", data["max_position_embeddings"])
            ),
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0),
            mscale=float(scaling.get("mscale") or 0.0),
            mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
            attention_factor=None if scaling.get("attention_factor") is None else float(scaling["attention_factor"]),
            truncate=bool(scaling.get("truncate", True)),
        )
    except KeyError as exc:
        raise ConfigError(f"rope_scaling: missing {exc.args[0]!r}") from None
    if rope.factor <= 0:
        raise ConfigError(f"rope_scaling.factor: must be positive, got {rope.factor}")
    return theta, rope


def _parse_quantization(quant: dict[str, Any] | None) -> tuple[int, int] | None:
    if not quant:
        return None
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(
            f"quantization_config: only fp8 e4m3 block quantization is supported, got {quant.get('quant_method')!r}"
        )
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ConfigError(f"quantization_config.weight_block_size: expected two positive ints, got {block}")
    return int(block[0]), int(block[1])


def _positive_int(data: dict[str, Any], key: str, default: int | None = None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _nonneg_int(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")
    return value


def _optional_token(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if isinstance(value, list):  # some configs list several end tokens; the first is the canonical one
        value = value[0] if value else None
    return None if value is None else int(value)
