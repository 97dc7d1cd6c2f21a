"""Kubernetes quantities: what the spec accepts, the local runner reads and the operator writes agree."""

from __future__ import annotations

import pytest

from r1serve.spec import quantity

ACCEPTED = ["8", "500m", "1.5", "2k", "64Gi", ".5", "2e3", "1E-2", "1.5G", "0"]
REFUSED = ["", "-1", "8 Gi", "8gi", "1.2.3", "Gi", "1e", "0x10", "1,5"]


@pytest.mark.parametrize("text", ACCEPTED)
def test_every_accepted_quantity_reads_as_a_number(text):
    assert quantity.check(text) == text
    assert quantity.to_float(text) >= 0


@pytest.mark.parametrize("text", REFUSED)
def test_every_refused_quantity_is_refused_by_each_reader(text):
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        quantity.check(text)
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity.to_float(text)
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity.scale(text, 2)


def test_written_quantities_read_back():
    assert quantity.to_float(quantity.scale("64Gi", 4)) == 256 * 2**30
    assert quantity.cpu(2.5) == "2500m" and quantity.to_float(quantity.cpu(2.5)) == 2.5
    assert quantity.cpu(3.0) == "3"
