"""The local socket API (docs/local-api.md): framing, protocol, trio server, clients.

Client and protocol names are importable from here; server names are loaded on first access
so that client-only users (the CLI) do not import trio.
"""

from __future__ import annotations

from typing import Any

from .client import (
    AsyncClient,
    AsyncSubscription,
    Client,
    ClientError,
    ConnectionLost,
    DaemonError,
    DaemonNotRunning,
    Subscription,
    open_client,
)
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame
from .protocol import OpError, Pending

__all__ = [
    "DEFAULT_MAX_FRAME",
    "OpError",
    "AsyncClient",
    "AsyncSubscription",
    "Client",
    "ClientError",
    "ConnectionLost",
    "DaemonAlreadyRunning",
    "DaemonError",
    "DaemonNotRunning",
    "FrameDecoder",
    "FrameError",
    "Handler",
    "Pending",
    "ServerStartError",
    "Session",
    "Subscription",
    "encode_frame",
    "open_client",
    "serve_unix",
]

_SERVER_NAMES = {"DaemonAlreadyRunning", "Handler", "ServerStartError", "Session", "serve_unix"}


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
