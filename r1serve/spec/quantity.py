"""Kubernetes quantities ('8', '500m', '64Gi', '1.5G', '2e3'): the one place that checks, reads and writes them."""

from __future__ import annotations

import re

# The API server's grammar (resource.Quantity): a decimal number, then a binary or decimal suffix or a
# decimal exponent; minus signs and exotic forms nobody uses for cpu/memory/shm are left out.
PATTERN = re.compile(r"(\d+(\.\d+)?|\.\d+)([eE][+-]?\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_MULTIPLIERS = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def check(value: str) -> str:
    """The value, if the API server would accept it as a quantity."""
    if not PATTERN.fullmatch(value):
        raise ValueError("must be a Kubernetes quantity such as '8', '500m', '64Gi' or '1.5G'")
    return value


def _parts(quantity: str) -> tuple[str, str]:
    match = PATTERN.fullmatch(quantity)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return match.group(1), match.group(3) or ""


def to_float(quantity: str) -> float:
    """'500m' -> 0.5, '2k' -> 2000.0, '1Gi' -> 1073741824.0, '2e3' -> 2000.0"""
    number, suffix = _parts(quantity)
    if suffix[:1] in ("e", "E"):
        return float(number + suffix)
    return float(number) * _MULTIPLIERS[suffix]


def scale(quantity: str, factor: int) -> str:
    """'64Gi' x 4 -> '256Gi': the unit is kept, so the result reads like the input."""
    number, suffix = _parts(quantity)
    return _format(float(number) * factor) + suffix


def cpu(cores: float) -> str:
    """Cores as a Kubernetes CPU quantity: whole cores plain, fractions in millicores."""
    return _format(cores) if float(cores).is_integer() else f"{round(cores * 1000)}m"


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
