"""The hub's port at the byte level: one HTTP/1.1 request and its answer (h11), the websocket
upgrade (wsproto's handshake), and the tasks that move one websocket's bytes
(`WebSocketTransport`). Nothing here decides what bytes mean or when to give up: h11, wsproto
and `WsConn` (wsconn.py) do; this module reads, writes and sleeps until their deadlines.

Why the writer has a fast path: fan-out. A broadcast puts the same frame bytes in every
recipient's outbox; `wake()` then writes an idle connection's frames at once with one
non-blocking `send()` on a duplicate of the socket (no task switch per recipient, no copy).
Only what the socket does not take waits for the writer task (and under TLS, everything does).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import AcceptConnection, RejectConnection
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from .wsconn import WsConn

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_HEAD",
    "BadRequest",
    "HttpExchange",
    "Request",
    "Upgraded",
    "WebSocketTransport",
    "remote_address",
]

log = logging.getLogger("peerdaemon.hub.transport")

MAX_HEAD = 16 * 1024
"""The largest request head accepted (a larger one gets 431)."""
RECEIVE_SIZE = 256 * 1024
SEND_CHUNK = 1 << 20
"""The writer hands the socket at most this much at a time: each chunk taken is progress."""
CLOSE_TIMEOUT = 2.0
"""How long a closing handshake (and a `/peer` handler's own close) may take."""


# ---------------------------------------------------------------------------------- HTTP/1.1
@dataclass(frozen=True)
class Request:
    """A request head, as h11 parsed it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    target: bytes = b""
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def wants_websocket(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"


@dataclass(frozen=True)
class Upgraded:
    """A request whose websocket upgrade was accepted (the `101` sent)."""

    request: Request
    proto: Connection  # wsproto's, for what the client sends and the control frames
    leftover: bytes  # read past the head: the client's first frames, maybe


class BadRequest(Exception):
    """A request the hub answers with an error `status` (400, 426, 431...)."""

    def __init__(
        self, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


class HttpExchange:
    """One request and its answer over a stream (the hub answers once and closes, or upgrades).

    h11 reads the head, bounded by `MAX_HEAD`, and writes the answer; it can answer even a
    request it could not parse (400, 431) or never saw (503 busy)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._method = ""
        self._eof = False

    async def read_request(self) -> Request | None:
        """The request head; None if the client left before sending one. `BadRequest` if
        it is not HTTP/1.1 or too large."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof:
                    return None  # a partial head, then the client left: nobody to answer
                raise BadRequest(exc.error_status_hint, f"bad request: {exc}") from None
            if isinstance(event, h11.Request):
                self._method = event.method.decode("ascii", "replace")
                return _request(event)
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(MAX_HEAD)  # h11 bounds what is incomplete
                self._eof = not data
                self.h11.receive_data(data)
                continue
            return None  # ConnectionClosed

    async def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """The answer, then the connection is done (`Connection: close`)."""
        fields = [
            (b"Content-Type", content_type.encode("ascii")),
            (b"Content-Length", str(len(body)).encode("ascii")),
            (b"Cache-Control", b"no-store"),
            (b"Connection", b"close"),
            # RFC 9110 6.6.1: an origin server with a clock sends one (`doctor` reads the skew)
            (b"Date", formatdate(usegmt=True).encode("ascii")),
            *headers,
        ]
        reason = HTTPStatus(status).phrase.encode("ascii") if status in _STATUSES else b""
        data = self.h11.send(h11.Response(status_code=status, headers=fields, reason=reason))
        if self._method != "HEAD":
            data = (data or b"") + (self.h11.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(data)

    async def respond_json(
        self, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        await self.respond(status, (json.dumps(body) + "\n").encode("utf-8"), headers=headers)

    async def upgrade(self, request: Request) -> Upgraded:
        """Accept a websocket upgrade of `request` with wsproto's handshake (sends the `101`).
        permessage-deflate is declined (no extensions), so every client can be sent the very
        same frame bytes. `BadRequest` if the upgrade request is not valid."""
        if request.method != "GET":
            raise BadRequest(400, "bad websocket upgrade request")
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.initiate_upgrade_connection(request.raw_headers, request.target)
            list(handshake.events())
        except WsRemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            headers = list(hint.headers) if isinstance(hint, RejectConnection) else []
            raise BadRequest(status, "bad websocket upgrade request", headers) from None
        except h11.ProtocolError:
            raise BadRequest(400, "bad websocket upgrade request") from None
        await self.stream.send_all(handshake.send(AcceptConnection(extensions=[])))
        proto = handshake.connection
        assert proto is not None
        return Upgraded(request, proto, self._leftover())

    def _leftover(self) -> bytes:
        """What h11 read past the head (the client's first websocket frames, maybe)."""
        try:
            while True:
                event = self.h11.next_event()
                if event is h11.PAUSED or event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:
            pass
        return bytes(self.h11.trailing_data[0])


_STATUSES = {s.value for s in HTTPStatus}


def _request(event: h11.Request) -> Request:
    target = event.target.decode("ascii", "replace")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        event.method.decode("ascii", "replace"),
        parts.path,
        dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers,
        bytes(event.target),
        [(bytes(n), bytes(v)) for n, v in event.headers],
    )


# --------------------------------------------------------------------------------- websocket
OnMessage = Callable[[bytes | str], Awaitable[None] | None]
"""Gets each message; an async one applies back-pressure (the reader waits for it)."""


class WebSocketTransport:
    """Moves one websocket's bytes between a trio stream and its `WsConn`: a reader that feeds
    it, and a writer that sends what it has and, while idle, sleeps until the core's deadline
    (two tasks a connection: an idle hub holds thousands)."""

    def __init__(self, stream: trio.abc.Stream, core: WsConn, leftover: bytes = b"") -> None:
        self.stream = stream
        self.core = core
        self.leftover = leftover
        self.drained = trio.Event()
        """Set while nothing waits to be written (replaced when the writer takes frames)."""
        self.reader_done = trio.Event()
        self.on_reader_done: Callable[[], None] | None = None
        self._wakeup = trio.Event()
        self._raw = _raw_socket(stream)
        self._idle = False  # the writer waits with nothing queued
        self._scope: trio.CancelScope | None = None

    @property
    def number(self) -> int:
        return self.core.outlet.number

    def wake(self) -> None:
        """The connection has something to write. An idle writer's frames go out right here
        with one non-blocking send (no task switch, no trio wrapper: that is what makes a
        broadcast to hundreds of clients cheap); only what the socket did not take wakes the
        writer task."""
        if self._idle and self._raw is not None and self.core.outlet.closing is None:
            if self._send_now():
                return
        self._wakeup.set()

    def _send_now(self) -> bool:
        frames = self.core.data_to_send()
        if not frames:
            return True
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            assert self._raw is not None
            sent = self._raw.send(data)
        except OSError:  # would block, or broken: the writer task finds out which
            sent = 0
        if sent >= len(data):
            return True
        self.core.put_back(memoryview(data)[sent:])
        return False

    def _after_core(self) -> None:
        """After the core was fed input or time: hang up if it cut the client, else let the
        writer send whatever it queued (a pong, a ping, a close)."""
        if self.core.cut:
            if self._scope is not None:
                self._scope.cancel()
            return
        outlet = self.core.outlet
        if outlet.closing is not None or len(outlet.outbox):
            self.wake()

    async def run(
        self, on_message: OnMessage, handler: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Until closed. `handler` (the /peer endpoint) runs beside, and may finish its own
        close within `CLOSE_TIMEOUT`."""
        handler_done = trio.Event()

        async def run_handler() -> None:
            try:
                assert handler is not None
                await handler()
            finally:
                handler_done.set()

        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._reader, on_message)
                if handler is not None:
                    nursery.start_soon(run_handler)
                await self._writer()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    if not self.core.lost:
                        await self.reader_done.wait()
                    if handler is not None:
                        await handler_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self._raw is not None:
                self._raw.close()
                self._raw = None
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _reader(self, on_message: OnMessage) -> None:
        core = self.core
        try:
            if self.leftover:
                leftover, self.leftover = self.leftover, b""
                core.receive_data(leftover, trio.current_time())
                await self._deliver(on_message)
            while not core.input_ended:
                data = await self._receive()
                core.receive_data(data, trio.current_time())
                await self._deliver(on_message)
        finally:
            self.reader_done.set()
            if self.on_reader_done is not None:
                self.on_reader_done()

    async def _deliver(self, on_message: OnMessage) -> None:
        core = self.core
        outlet = core.outlet
        while (message := core.next_message()) is not None:
            if outlet.closing is None:
                result = on_message(message)
                if result is not None:
                    await result
        self._after_core()

    async def _receive(self) -> bytes | None:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        return data or None

    async def _writer(self) -> None:
        core = self.core
        while True:
            self._wakeup = trio.Event()
            frames = core.data_to_send()
            if frames:
                self.drained = trio.Event()
                if not await self._send(frames):
                    return
                continue
            self.drained.set()
            if core.finished:
                return
            self._idle = True
            try:
                with trio.move_on_at(core.get_timer()):
                    await self._wakeup.wait()
            finally:
                self._idle = False
            now = trio.current_time()
            if not self._wakeup.is_set() and now >= core.get_timer():
                core.handle_timer(now)  # a ping, a cut, a handshake deadline
                self._after_core()

    async def _send(self, frames: list[bytes | memoryview]) -> bool:
        """Write `frames`; False if the connection is gone or the core found the client too
        slow (a chunk not taken by its `write_deadline`)."""
        core = self.core
        for chunk in _chunks(frames):
            core.write_waiting(trio.current_time())
            with trio.move_on_at(core.write_deadline):
                try:
                    await self.stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    core.connection_lost()
                    return False
                continue
            core.handle_timer(trio.current_time())  # the chunk was not taken in time
            if not core.lost:  # a cancelled write leaves the stream unusable
                core.connection_lost()
            return False
        core.write_done()
        return True


def _chunks(frames: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """`frames` as few writes of at most about `SEND_CHUNK` each (a big frame is sliced, small
    ones are joined)."""
    chunks: list[bytes | memoryview] = []
    pending: list[bytes | memoryview] = []
    pending_size = 0
    for frame in frames:
        if len(frame) >= SEND_CHUNK:
            if pending:
                chunks.append(b"".join(pending))
                pending, pending_size = [], 0
            view = memoryview(frame)
            chunks.extend(view[i : i + SEND_CHUNK] for i in range(0, len(frame), SEND_CHUNK))
        else:
            pending.append(frame)
            pending_size += len(frame)
            if pending_size >= SEND_CHUNK:
                chunks.append(b"".join(pending))
                pending, pending_size = [], 0
    if pending:
        chunks.append(pending[0] if len(pending) == 1 else b"".join(pending))
    return chunks


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """A duplicate of a plain TCP stream's socket (same non-blocking file description), for
    `WebSocketTransport.wake`'s immediate writes; None under TLS."""
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        return socket.socket(fileno=os.dup(stream.socket.fileno()))
    except OSError:
        return None


def remote_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The client's address (through TLS), or None."""
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
