"""SamplingParams: defaults, normalisation and one error message per bad field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from r1serve.runtime.engine.sampling import SamplingParams, SamplingParamsError


def test_defaults_are_valid_and_random():
    params = SamplingParams()
    assert params.max_tokens == 256 and params.temperature == 1.0 and params.top_k == -1
    assert not params.is_greedy and not params.top_k_enabled
    assert params.stop == () and params.stop_token_ids == () and params.skip_special_tokens


def test_frozen_and_hashable():
    params = SamplingParams(stop=["a"], stop_token_ids=[3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.top_p = 0.5  # type: ignore[misc]
    assert hash(params) == hash(SamplingParams(stop=("a",), stop_token_ids=(3,)))


@pytest.mark.parametrize("temperature, greedy", [(0, True), (0.0, True), (1e-6, True), (0.01, False), (100, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_numbers_are_normalised():
    params = SamplingParams(temperature=1, top_p=1, min_p=0)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float) and isinstance(params.min_p, float)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens: must be at least 1 (got 0)"),
        ({"max_tokens": True}, "max_tokens: must be an integer (got True)"),
        ({"max_tokens": 2.0}, "max_tokens: must be an integer (got 2.0)"),
        ({"temperature": -0.1}, "temperature: must be in [0, 100] (got -0.1)"),
        ({"temperature": 100.5}, "temperature: must be in [0, 100] (got 100.5)"),
        ({"temperature": "0.5"}, "temperature: must be a number (got '0.5')"),
        ({"temperature": math.nan}, "temperature: must be finite (got nan)"),
        ({"temperature": math.inf}, "temperature: must be finite (got inf)"),
        ({"temperature": False}, "temperature: must be a number (got False)"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1] (got 1.5)"),
        ({"top_p": 0}, "top_p: must be in (0, 1] (got 0)"),
        ({"top_p": math.nan}, "top_p: must be finite (got nan)"),
        ({"top_k": -2}, "top_k: must be -1 or 0 (disabled) or at least 1 (got -2)"),
        ({"top_k": 1.0}, "top_k: must be an integer (got 1.0)"),
        ({"min_p": 1.01}, "min_p: must be in [0, 1] (got 1.01)"),
        ({"min_p": -0.5}, "min_p: must be in [0, 1] (got -0.5)"),
        ({"seed": -1}, "seed: must be in [0, 2**63) (got -1)"),
        ({"seed": 2**63}, f"seed: must be in [0, 2**63) (got {2**63})"),
        ({"seed": "7"}, "seed: must be an integer (got '7')"),
        ({"stop": [""]}, "stop: stop strings must not be empty (got '')"),
        ({"stop": ["x"] * 17}, "stop: at most 16 stop strings are allowed (got 17)"),
        ({"stop": ["x" * 257]}, "stop: each stop string must have at most 256 characters (got 257)"),
        ({"stop": [1]}, "stop: each stop string must be a string (got 1)"),
        ({"stop": 5}, "stop: must be a string or a list of strings (got 5)"),
        ({"stop_token_ids": [-1]}, "stop_token_ids: each id must be non-negative (got -1)"),
        ({"stop_token_ids": ["1"]}, "stop_token_ids: must be an integer (got '1')"),
        ({"stop_token_ids": 3}, "stop_token_ids: must be a list of integers (got 3)"),
        ({"ignore_eos": 1}, "ignore_eos: must be true or false (got 1)"),
        ({"skip_special_tokens": "yes"}, "skip_special_tokens: must be true or false (got 'yes')"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output: must be true or false (got None)"),
    ],
)
def test_invalid_values_name_field_and_value(kwargs, message):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 100},
        {"top_p": 1e-9},
        {"top_k": 0},
        {"top_k": 1},
        {"min_p": 1.0},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"stop": ["x"] * 16},
        {"stop": ["x" * 256]},
        {"max_tokens": 1},
    ],
)
def test_boundary_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_from_dict_accepts_lists_single_string_and_nulls():
    params = SamplingParams.from_dict(
        {"stop": ["\n\n", "END"], "stop_token_ids": [5, 6], "temperature": 0.6, "seed": None, "top_k": None}
    )
    assert params.stop == ("\n\n", "END") and params.stop_token_ids == (5, 6)
    assert params.temperature == 0.6 and params.seed is None and params.top_k == -1
    assert SamplingParams.from_dict({"stop": "END"}).stop == ("END",)
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(SamplingParamsError, match=r"unknown sampling parameter\(s\): best_of, n \(expected some of:"):
        SamplingParams.from_dict({"n": 2, "best_of": 3, "top_p": 0.9})
    with pytest.raises(SamplingParamsError, match="must be an object"):
        SamplingParams.from_dict(["top_p"])  # type: ignore[arg-type]


def test_from_dict_validates_values():
    with pytest.raises(SamplingParamsError, match=r"top_p: must be in \(0, 1\] \(got 2\)"):
        SamplingParams.from_dict({"top_p": 2})


def test_check_against_vocab():
    params = SamplingParams(stop_token_ids=(0, 99))
    params.check_against(100)
    with pytest.raises(SamplingParamsError, match=r"stop_token_ids: each id must be in \[0, 99\) \(got 99\)"):
        params.check_against(99)
