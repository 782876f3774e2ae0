"""Shared test setup: where the real Mockoon fixtures live (helpers are in modelutil.py)."""

import pytest
from modelutil import FIXTURE_DIR, load


@pytest.fixture
def fixture_dir():
    return FIXTURE_DIR


@pytest.fixture
def load_fixture():
    """`load_fixture("test-env.json")` -> a fresh parsed copy of a fixture."""
    return load
