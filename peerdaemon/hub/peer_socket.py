"""The `/peer` path: daemons' websockets, handed to the hub's `PeerHandler` (peers.py) as the
trio-websocket-like object `peerdaemon.peer.link.Link` runs on, so the LAN link code works on
the hub's transport unchanged.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio
from trio_websocket import CloseReason, ConnectionClosed

from ..peer import Slot
from .transport import CLOSE_TIMEOUT, Request, WebSocketTransport
from .wsconn import OPCODE_TEXT, ws_frame
from .ywebsocket import Outlet

__all__ = ["HubWebSocket", "NotAvailablePeerHandler", "PeerHandler", "PeerSocket"]

log = logging.getLogger("peerdaemon.hub.peer")

INCOMING_QUEUE = 64
"""Messages read ahead of the handler; past that the reader waits (back-pressure)."""


class HubWebSocket(Protocol):
    """The websocket `/peer` handlers get: the subset of trio-websocket's `WebSocketConnection`
    that `peerdaemon.peer.link.Link` uses. `get_message` / `send_message` raise
    `trio_websocket.ConnectionClosed` once closed."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    remote: tuple[str, int] | None
    slot: Slot | None
    """The connection's place among the unauthenticated ones: `release()` it once the daemon
    has authenticated (until then it counts against the hub's half-open limits, and is cut
    `handshake_timeout` + `CLOSE_TIMEOUT` after the upgrade)."""

    async def get_message(self) -> bytes | str: ...
    async def send_message(self, message: bytes | str) -> None: ...
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...
    @property
    def closed(self) -> CloseReason | None: ...


class PeerHandler(Protocol):
    """The daemons' protocol on the hub (peers.py). It may also have
    `async def run(self, *, task_status)`; the server then starts it before listening."""

    async def handle_peer(self, ws: HubWebSocket) -> None: ...


class NotAvailablePeerHandler:
    """Without a daemons' protocol: every `/peer` connection is closed, "not-available"."""

    async def handle_peer(self, ws: HubWebSocket) -> None:
        await ws.aclose(1013, "not-available")


class PeerSocket:
    """`HubWebSocket` over a `WebSocketTransport`."""

    def __init__(
        self,
        transport: WebSocketTransport,
        request: Request,
        remote: tuple[str, int] | None,
        slot: Slot | None,
        *,
        send_limit: int,
    ) -> None:
        self._transport = transport
        self._outlet: Outlet = transport.core.outlet
        self._send_limit = send_limit
        self.path = request.path
        self.query = request.query
        self.headers = request.headers
        self.remote = remote
        self.slot = slot
        self._to_handler, self._incoming = trio.open_memory_channel[bytes | str](INCOMING_QUEUE)

    @property
    def closed(self) -> CloseReason | None:
        closing = self._outlet.closing
        return CloseReason(closing[0], closing[1]) if closing is not None else None

    def _closed_error(self) -> ConnectionClosed:
        closing = self._outlet.closing or (1006, "connection lost")
        return ConnectionClosed(CloseReason(closing[0], closing[1]))

    async def get_message(self) -> bytes | str:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None

    async def send_message(self, message: bytes | str) -> None:
        """Queue `message`; waits while more than `send_limit` bytes are queued (a daemon link
        waits for its reader rather than growing the hub's memory)."""
        outlet = self._outlet
        transport = self._transport
        while outlet.closing is None and outlet.outbox.nbytes > self._send_limit:
            await transport.drained.wait()
        if outlet.closing is not None:
            raise self._closed_error()
        if isinstance(message, str):
            outlet.send(ws_frame(message.encode("utf-8"), opcode=OPCODE_TEXT))
        else:
            outlet.send(ws_frame(bytes(message)))
        transport.wake()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self._outlet.close(code, reason or "")
        self._transport.wake()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._transport.reader_done.wait()

    def _close(self, code: int, reason: str) -> None:
        self._outlet.close(code, reason)
        self._transport.wake()

    async def serve(self, handler: PeerHandler) -> None:
        """Run `handler` on this socket until the connection closes: the transport's reader
        feeds `get_message` (and waits while the handler lags); an exception in the handler
        closes this connection only (1011)."""
        to_handler = self._to_handler
        self._transport.on_reader_done = to_handler.close  # get_message raises after the rest

        async def on_message(data: bytes | str) -> None:
            try:
                await to_handler.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async def run_handler() -> None:
            try:
                await handler.handle_peer(self)
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("peer connection from %s failed", self.remote)
                self._close(1011, "internal-error")
            finally:
                self._close(1000, "")
                self._incoming.close()

        await self._transport.run(on_message, run_handler)
