"""Invalid R1Deployments: each error names the camelCase YAML path and the offending value."""

import pytest

from r1serve.spec import SpecError, load_r1deployment

from .invalid_cases import BASE, INVALID, Layer

SPEC_CASES = [row for row in INVALID if Layer.SPEC in row.layers]


@pytest.mark.parametrize("row", SPEC_CASES, ids=[row.id for row in SPEC_CASES])
def test_invalid_spec_names_field_and_value(row):
    with pytest.raises(SpecError) as info:
        load_r1deployment(row.doc)
    message = str(info.value)
    for fragment in (row.field, *row.says):
        assert fragment in message, f"{fragment!r} not in:\n{message}"


YAML_CASES = [
    ("syntax_error", ("apiVersion: r1serve.io/v1alpha1\nkind: R1Deployment\nmetadata:\n"
     "  name: r1\n spec: [unclosed\n"), ["line 5", "invalid YAML"]),
    ("duplicate_key", ("apiVersion: r1serve.io/v1alpha1\nkind: R1Deployment\n"
     "metadata: {name: a}\nmetadata: {name: b}\n"), ["line 4", "duplicate key 'metadata'"]),
    ("empty_file", "# nothing here\n", ["no document"]),
    ("not_a_mapping", "- just\n- a list\n", ["must be a mapping"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in YAML_CASES],
                         ids=[c[0] for c in YAML_CASES])
def test_invalid_yaml_names_file_and_line(tmp_path, text, expected):
    path = tmp_path / "r1.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_r1deployment(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_base_case_is_valid():
    assert load_r1deployment(BASE).metadata.name == "r1"
