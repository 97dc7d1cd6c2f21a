"""Property-based fuzzing of what users send the engine: every bad value is a named client error."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1serve.runtime.engine.sampling import SamplingParams, SamplingParamsError

FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
          "skip_special_tokens", "include_stop_str_in_output"]

anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300), st.binary(max_size=20),
    st.lists(st.one_of(st.integers(), st.text(max_size=5), st.floats()), max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
requests = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), anything, max_size=8)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(requests)
def test_any_request_body_is_accepted_or_refused_by_name(body):
    try:
        params = SamplingParams.from_dict(body)
    except SamplingParamsError as exc:
        message = str(exc)
        assert message, "an error must say what is wrong"
        named = [f for f in FIELDS if message.startswith(f + ":")] or "unknown sampling parameter" in message \
            or "must be an object" in message
        assert named, f"error does not name the field: {message}"
        return
    # Accepted values are within the documented ranges.
    assert params.max_tokens >= 1 and 0 <= params.temperature <= 100 and math.isfinite(params.temperature)
    assert 0 < params.top_p <= 1 and 0 <= params.min_p <= 1 and params.top_k >= -1
    assert all(isinstance(s, str) and s for s in params.stop)


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_a_body_that_is_not_an_object_is_refused(body):
    with pytest.raises(SamplingParamsError, match="must be an object"):
        SamplingParams.from_dict(body)
