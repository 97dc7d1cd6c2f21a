"""Fixtures of the model tests."""

from __future__ import annotations

import random

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed for each test's random inputs, printed so that a failure can be reproduced."""
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    return value
