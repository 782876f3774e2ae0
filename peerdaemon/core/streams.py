"""Facts about a trio stream that the websocket shells need: the descriptor to write to from
the sending task, and the address of the other end. Shared by the LAN link's websocket
(core/wsstream.py) and the hub's transport, and small, so the hub loads it at start."""

from __future__ import annotations

from typing import Any

import trio

__all__ = ["socket_fd", "stream_remote"]


def socket_fd(stream: trio.abc.Stream) -> int:
    """A plain TCP stream's descriptor (non-blocking, as trio keeps it), for writes from the
    sending task; -1 under TLS."""
    if not isinstance(stream, trio.SocketStream):
        return -1
    return stream.socket.fileno()


def stream_remote(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """`(host, port)` of the other end of a TCP stream (through TLS), or None."""
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
