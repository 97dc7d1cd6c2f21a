"""The kept expert load's format: what it holds, that DeepSeek's largest layout fits a ConfigMap, and that load
of another model is refused with the reason."""

from __future__ import annotations

import pytest

from r1serve.spec import expert_load as E


def test_each_layer_is_scaled_to_its_busiest_expert_and_read_back_in_proportion():
    text = E.encode({3: [0, 10, 40], 5: [7, 7, 7], 4: [0, 0, 0]})
    assert text == '{"3":[0,16384,65535],"5":[65535,65535,65535]}'  # a layer that saw nothing is left out
    load = E.decode(text, num_experts=3, layers=[3, 4, 5])
    assert load[3] == [0.0, 16384.0, 65535.0] and 4 not in load


def test_deepseeks_largest_layout_fits_a_configmap_for_both_pools():
    layers, experts = E.LARGEST
    worst = {layer: [E.SCALE - 1] * (experts - 1) + [E.SCALE] for layer in range(layers)}
    text = E.encode(worst)
    assert 2 * (len(text) + len(E.pool_key("prefill"))) < E.MAX_BYTES


@pytest.mark.parametrize("text, says", [
    ("not json", "not JSON"),
    ("[1, 2]", "expected an object of MoE layer -> expert loads"),
    ('{"x": [1]}', "layer 'x' is not a layer number"),
    ('{"0": [1, 2, 3]}', "layer 0 is not a MoE layer of this model"),
    ('{"3": [1, 2]}', "layer 3: 2 experts, the model has 3"),
    ('{"3": [1, -2, 3]}', "layer 3: expected a list of non-negative numbers"),
])
def test_load_that_does_not_fit_the_model_is_refused_with_the_reason(text, says):
    with pytest.raises(E.ExpertLoadError, match=says):
        E.decode(text, num_experts=3, layers=[3, 4])


def test_replicas_loads_merge_layer_by_layer():
    merged = E.merge([{3: [1.0, 2.0]}, {3: [3.0, 0.0], 4: [1.0, 1.0]}])
    assert merged == {3: [4.0, 2.0], 4: [1.0, 1.0]}
    assert E.configmap_name("r1") == "r1-expert-load" and E.pool_key("decode") == "decode.json"
