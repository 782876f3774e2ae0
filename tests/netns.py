"""The network namespace lab (lab/netnslab.py, shared with the benchmarks), and the skip tests
use when namespaces cannot be made here. Child processes started from tests/ import it too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
from netnslab import (  # noqa: E402
    INTERFACE,
    OUTER_NETNS_ENV,
    SUBNET,
    NetnsLab,
    netns_inode,
    netns_unavailable_reason,
    private_namespace_problem,
)

__all__ = [
    "INTERFACE",
    "OUTER_NETNS_ENV",
    "SUBNET",
    "NetnsLab",
    "netns_inode",
    "netns_unavailable_reason",
    "private_namespace_problem",
    "require_netns",
]


def require_netns() -> None:
    """Skip the current test unless network namespaces can be created here."""
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"needs private network namespaces: {reason}")
