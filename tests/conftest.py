"""Shared test setup: where the real Mockoon fixtures live (helpers are in modelutil.py)."""

import os

import pytest
from modelutil import FIXTURE_DIR, load


@pytest.fixture
def fixture_dir():
    return FIXTURE_DIR


@pytest.fixture
def load_fixture():
    """`load_fixture("test-env.json")` -> a fresh parsed copy of a fixture."""
    return load


@pytest.fixture(autouse=True, scope="session")
def _no_mdns_outside_namespaces():
    """Network safety: no daemon a test starts (in process or as a child) may run mDNS on this
    machine's own interfaces; the namespace tests opt back in explicitly for their children."""
    previous = os.environ.get("PEERDAEMON_NO_MDNS")
    os.environ["PEERDAEMON_NO_MDNS"] = "1"
    yield
    if previous is None:
        os.environ.pop("PEERDAEMON_NO_MDNS", None)
    else:
        os.environ["PEERDAEMON_NO_MDNS"] = previous
