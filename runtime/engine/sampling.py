"""Per-request sampling parameters, validated once where a request enters the engine."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_STOP_STRINGS", "MAX_STOP_STRING_LEN", "SamplingParams", "SamplingParamsError"]

# max_tokens when a caller of the engine or of the gRPC API sets none (lowered to what the context leaves).
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_TEMPERATURE = 100.0
# Below this a temperature would overflow float32 logits; vLLM treats it as greedy too.
GREEDY_EPSILON = 1e-5


class SamplingParamsError(ValueError):
    """A sampling parameter with the wrong type or out of range; the message names the field.

    `field` is None when the problem is not one field's (the message then names what it is about)."""

    def __init__(self, message: str, field: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.problem = field, problem if problem is not None else message


def _fail(field: str, problem: str, value: Any) -> SamplingParamsError:
    problem = f"{problem} (got {value!r})"
    return SamplingParamsError(f"{field}: {problem}", field, problem)


def _require_int(field: str, value: Any) -> int:
    # bool is an int subclass, but `max_tokens=True` is always a client bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, "must be an integer", value)
    return value


def _require_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, "must be a number", value)
    if not math.isfinite(value):
        raise _fail(field, "must be finite", value)
    return float(value)


def _require_range(field: str, value: Any, low: float, high: float) -> float:
    number = _require_float(field, value)
    if not low <= number <= high:
        raise _fail(field, f"must be in [{low:g}, {high:g}]", value)
    return number


def _require_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, "must be true or false", value)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, with the names and meanings vLLM and SGLang use."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 disables top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        if _require_int("max_tokens", self.max_tokens) < 1:
            raise _fail("max_tokens", "must be at least 1", self.max_tokens)
        set_(self, "temperature", _require_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        top_p = _require_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise _fail("top_p", "must be in (0, 1]", self.top_p)
        set_(self, "top_p", top_p)
        if _require_int("top_k", self.top_k) < -1:
            raise _fail("top_k", "must be -1 or 0 (disabled) or at least 1", self.top_k)
        set_(self, "min_p", _require_range("min_p", self.min_p, 0.0, 1.0))
        if self.seed is not None and not 0 <= _require_int("seed", self.seed) < 2**63:
            raise _fail("seed", "must be in [0, 2**63)", self.seed)
        set_(self, "stop", _checked_stop(self.stop))
        set_(self, "stop_token_ids", _checked_stop_token_ids(self.stop_token_ids))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _require_bool(name, getattr(self, name))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a request body: lists for stop/stop_token_ids, a single stop string, null = default."""
        if not isinstance(data, Mapping):
            raise SamplingParamsError(f"sampling parameters must be an object (got {type(data).__name__})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise SamplingParamsError(
                f"unknown sampling parameter(s): {', '.join(unknown)} (expected some of: {', '.join(sorted(known))})"
            )
        # OpenAI-style clients send null for "not set"; seed is the one field whose default is null.
        return cls(**{key: value for key, value in data.items() if value is not None})

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    def check_against(self, vocab_size: int) -> None:
        """Raise SamplingParamsError if a stop token id lies outside the tokenizer's vocabulary."""
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise _fail("stop_token_ids", f"each id must be in [0, {vocab_size})", token_id)


def _checked_stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)  # a bare string is one stop string, not a tuple of characters
    if not isinstance(value, (list, tuple)):
        raise _fail("stop", "must be a string or a list of strings", value)
    if len(value) > MAX_STOP_STRINGS:
        raise _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed", len(value))
    for item in value:
        if not isinstance(item, str):
            raise _fail("stop", "each stop string must be a string", item)
        if not item:
            raise _fail("stop", "stop strings must not be empty", item)
        if len(item) > MAX_STOP_STRING_LEN:
            raise _fail("stop", f"each stop string must have at most {MAX_STOP_STRING_LEN} characters", len(item))
    return tuple(value)


def _checked_stop_token_ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _fail("stop_token_ids", "must be a list of integers", value)
    for item in value:
        if _require_int("stop_token_ids", item) < 0:
            raise _fail("stop_token_ids", "each id must be non-negative", item)
    return tuple(value)
