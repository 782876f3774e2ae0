"""Default locations, shared by the daemon (`peerdaemon run`) and every client command."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["APP_NAME", "SOCKET_NAME", "default_data_dir", "default_socket_path"]

APP_NAME = "peerdaemon"
SOCKET_NAME = "peerdaemon.sock"


def default_data_dir() -> Path:
    """`$PEERDAEMON_DATA_DIR`, else the platform's user data dir (~/.local/share/peerdaemon)."""
    env = os.environ.get("PEERDAEMON_DATA_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs  # here: a process given its data dir (`hub serve`) does not keep it

    return platformdirs.user_data_path(APP_NAME, appauthor=False)


def default_socket_path() -> Path:
    """`$PEERDAEMON_SOCKET`, else `$XDG_RUNTIME_DIR/peerdaemon/peerdaemon.sock`, else
    `/tmp/peerdaemon-<uid>/peerdaemon.sock` (the server insists that directory is ours, 0700).

    A fixed /tmp (not $TMPDIR) keeps the daemon and clients agreeing even when started from
    environments with different TMPDIRs, and keeps the path within the AF_UNIX length limit.
    """
    env = os.environ.get("PEERDAEMON_SOCKET")
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / APP_NAME / SOCKET_NAME
    return Path("/tmp") / f"{APP_NAME}-{os.getuid()}" / SOCKET_NAME
