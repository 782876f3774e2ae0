"""Who is at the other end of a connected Unix socket (SO_PEERCRED), for both sides.

The server admits only its own user; a client talks only to a daemon of its own user or of
root. Without the client's check, another user who binds a `--socket` path in a shared
directory first would receive whatever the client sends (a hub token, environments).
No trio here: the blocking client and the CLI use it too.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

__all__ = ["listener_allowed", "peer_credentials"]

_PEERCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a connected Unix socket's peer, or None if the OS lacks SO_PEERCRED."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, opt, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def listener_allowed(uid: int | None) -> bool:
    """A client may talk to a listener of its own uid or of root (who could read its memory
    anyway); None = the platform cannot tell, and the socket directory's mode decides."""
    return uid is None or uid in (os.getuid(), 0)
