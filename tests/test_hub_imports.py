"""What a started hub keeps loaded: not the daemon's machinery it never uses (issue 13, the
hub's idle memory). Each module below is loaded on first use instead (a daemon's link, an
awareness, a hosted mock's files, another CLI command)."""

from __future__ import annotations

import subprocess
import sys

NOT_AT_START = [
    "peerdaemon.cli.env",  # other command groups (cli/__init__.py loads the invoked one)
    "peerdaemon.cli.doctor",
    "peerdaemon.spaces.service",  # the device's spaces (spaces/__init__.py)
    "peerdaemon.spaces.invite",
    "peerdaemon.mirror",  # a hosted mock's files (hub/mocks.py)
    "peerdaemon.presence",  # the first awareness (hub/peers.py)
    "peerdaemon.peer.link",  # the first daemon (hub/peers.py)
    "cryptography.hazmat.primitives.serialization",  # the key's raw bytes only (core/identity.py)
]


def test_hub_serve_imports_leave_the_rest_unloaded():
    code = (
        "import sys; from peerdaemon import cli; cli.build_parser(cli.command_of(['hub', 'serve']));"
        "import peerdaemon.hub.server; print(' '.join(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "peerdaemon.hub.server" in loaded
    assert [m for m in NOT_AT_START if m in loaded] == []
