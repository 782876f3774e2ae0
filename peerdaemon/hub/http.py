"""The hub's one port: plain HTTP (`GET /health`), and websocket upgrades for `/yjs/SPACE/DOC`
(y-websocket clients) and `/peer` (daemons, handed to a `PeerEndpoint`).

Why wsproto rather than trio-websocket: fan-out. The server builds each outgoing frame's bytes
once (unmasked, binary, no compression: permessage-deflate is declined so every client gets
byte-identical frames) and appends the same `bytes` object to every recipient's `Outbox`; one
writer task per connection drains its outbox with as few `send_all` calls as it can. wsproto
only parses what clients send (masking, fragments, ping, close). A writer that makes no
progress for `stall_seconds` is cut off; an outbox that overflows is dropped by the room logic
(`ywebsocket.Outbox`), so no client can stall a room or the hub.

Connections that have not authenticated yet are bounded like the LAN listener's
(`peer.admission.Admission`): every accepted connection holds a `Slot` until it is answered
(plain HTTP), its token is accepted (`/yjs`) or the daemon's auth is (`/peer`: the endpoint
releases `ws.slot`), or it ends. Past `max_half_open` in total or `max_half_open_per_ip` from
one address, one more is answered `503 busy` at once and closed. The request head must arrive
within `head_timeout`, and a websocket still unauthenticated `handshake_timeout` (plus a grace
to close politely) after its upgrade is cut.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..core.events import EventLog
from ..peer.admission import BUSY_BODY, BUSY_STATUS, Admission, Slot
from .accounts import Accounts, LimitExceeded
from .docs import check_ids
from .ywebsocket import CLOSE_CODES, Outbox, Rooms, YConn

__all__ = [
    "HttpConfig",
    "HubHttp",
    "HubWebSocket",
    "NotAvailablePeerEndpoint",
    "PeerEndpoint",
    "ws_frame",
]

log = logging.getLogger("peerdaemon.hub.http")

MAX_HEAD = 16 * 1024
REFUSE_TIMEOUT = 1.0
"""How long refusing one connection over the limits may take (reading its request head)."""
RECEIVE_SIZE = 256 * 1024
SEND_CHUNK = 1 << 20
CLOSE_TIMEOUT = 2.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BUSY_RESPONSE = (
    f"HTTP/1.1 {BUSY_STATUS} Service Unavailable\r\nContent-Type: text/plain\r\n"
    f"Content-Length: {len(BUSY_BODY)}\r\nConnection: close\r\n\r\n"
).encode("ascii") + BUSY_BODY


@dataclass
class HttpConfig:
    max_message: int = 256 << 20  # largest websocket message accepted (a 15 MB first sync is one)
    coalesce_bytes: int = 1 << 20  # a client's queued updates get merged past this
    limit_bytes: int = 64 << 20  # ... and the client is dropped (1013 too-slow) past this
    stall_seconds: float = 30.0  # a writer without progress this long: the client is dropped
    ping_interval: float = 30.0  # a silent client is pinged; silent for twice this: dropped
    # Connections not authenticated yet (docs/hub.md, "Connections in their handshake"):
    max_half_open: int = 256  # at most this many at once; one more gets 503 busy
    max_half_open_per_ip: int = 16  # ... and this many from one remote address
    head_timeout: float = 10.0  # the request head must arrive (and be answered) by then
    handshake_timeout: float = 10.0  # a websocket must authenticate by then (+ CLOSE_TIMEOUT)


def ws_frame(*parts: bytes, opcode: int = 0x2) -> bytes:
    """An unmasked, final server frame (binary by default) holding `parts` joined: built once,
    written to many."""
    n = sum(len(p) for p in parts)
    b0 = 0x80 | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 126, n)
    else:
        head = struct.pack("!BBQ", b0, 127, n)
    return b"".join((head, *parts))


# ------------------------------------------------------------------------------ peer plug-in
class HubWebSocket(Protocol):
    """The websocket `/peer` handlers get: the subset of trio-websocket's `WebSocketConnection`
    that `peerdaemon.peer.link.Link` uses, so the LAN link code runs on it unchanged.
    `get_message` / `send_message` raise `trio_websocket.ConnectionClosed` once closed."""

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


class PeerEndpoint(Protocol):
    """The daemons' protocol on the hub (peerdaemon/hub/peers.py). An endpoint may also have
    `async def run(self, *, task_status)`; the server then starts it before listening."""

    async def handle_peer(self, ws: HubWebSocket) -> None: ...


class NotAvailablePeerEndpoint:
    """Until the daemons' endpoint exists: every `/peer` connection is closed, "not-available"."""

    async def handle_peer(self, ws: HubWebSocket) -> None:
        await ws.aclose(1013, "not-available")


# ------------------------------------------------------------------------------------ session
class _Session:
    """One websocket connection's I/O: a reader (wsproto) and a writer (the conn's outbox)."""

    def __init__(
        self, stream: trio.abc.Stream, conn: YConn, leftover: bytes, config: HttpConfig
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.config = config
        self.proto = Connection(ConnectionType.SERVER, extensions=[])
        self.leftover = leftover
        self._wakeup = trio.Event()
        self.drained = trio.Event()
        self.lost = False  # the transport is gone: no close frame can be sent
        self.remote_close: tuple[int, str] | None = None
        self.reader_done = trio.Event()
        self.on_reader_done: Callable[[], None] | None = None
        self._raw = _raw_socket(stream)
        self._idle = False  # the writer waits with nothing queued
        self.last_received = trio.current_time()
        self._scope: trio.CancelScope | None = None
        conn.wake = self.wake

    def ping(self) -> None:
        """Ask a silent client for a pong (any frame it sends counts as alive)."""
        if self.conn.closing is None and self.proto.state is ConnectionState.OPEN:
            self.conn.send(self.proto.send(Ping(b"")))

    def abort(self, reason: str) -> None:
        """Hang up without a closing handshake (the client is gone or stuck)."""
        log.info("websocket client %s: %s; dropped", self.conn.number, reason)
        self.lost = True
        self.conn.close(1006, reason)
        if self._scope is not None:
            self._scope.cancel()

    def wake(self) -> None:
        """Called for every queued frame: an idle writer's frames go out right here with one
        non-blocking send (no task switch, no trio wrapper: that is what makes a broadcast to
        hundreds of clients cheap); only what the socket did not take wakes the writer."""
        if self._idle and self._raw is not None and self.conn.closing is None:
            if self._send_now():
                return
        self._wakeup.set()

    def _send_now(self) -> bool:
        outbox = self.conn.outbox
        frames = outbox.take()
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
        outbox.put_back(memoryview(data)[sent:])
        return False

    async def run(
        self,
        on_message: Callable[[bytes | str], Awaitable[None] | None],
        handler: Callable[[], Awaitable[None]] | None = None,
        *,
        slot: Slot | None = None,
        auth_deadline: float = math.inf,
    ) -> None:
        """Until closed. `on_message` gets each message (an async one applies back-pressure);
        `handler` (the /peer endpoint) runs beside and may finish its close within the grace.
        If `slot` is still held at `auth_deadline` (not authenticated yet), the connection is
        cut."""
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
                if slot is not None and not slot.released:
                    nursery.start_soon(self._watchdog, slot, auth_deadline)
                nursery.start_soon(self._reader, on_message)
                if handler is not None:
                    nursery.start_soon(run_handler)
                await self._writer()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    if not self.lost:
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

    async def _watchdog(self, slot: Slot, deadline: float) -> None:
        await trio.sleep_until(deadline)
        if not slot.released:
            self.abort("not authenticated in time")

    def _close_from_remote(self, code: int, reason: str, *, lost: bool = False) -> None:
        self.remote_close = (code, reason)
        if lost:
            self.lost = True
        self.conn.close(code, reason)
        self.wake()

    async def _reader(self, on_message: Callable[[bytes | str], Awaitable[None] | None]) -> None:
        buf: list[bytes] = []
        size = 0
        text = False
        try:
            data = self.leftover
            while True:
                if data:
                    self.proto.receive_data(data)
                else:
                    data = await self._receive()
                    self.last_received = trio.current_time()
                    if data is None:
                        self._close_from_remote(1006, "connection lost", lost=True)
                        return
                    self.proto.receive_data(data)
                data = b""
                for event in self.proto.events():
                    if isinstance(event, BytesMessage | TextMessage):
                        chunk = event.data
                        text = isinstance(event, TextMessage)
                        size += len(chunk)
                        if size > self.config.max_message:
                            self.conn.close(CLOSE_CODES["too-large"], "too-large")
                            return
                        buf.append(chunk.encode("utf-8") if text else bytes(chunk))
                        if event.message_finished:
                            message = buf[0] if len(buf) == 1 else b"".join(buf)
                            buf, size = [], 0
                            if self.conn.closing is None:
                                result = on_message(message.decode("utf-8") if text else message)
                                if result is not None:
                                    await result
                    elif isinstance(event, Ping):
                        self.conn.send(self.proto.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        code = int(event.code)
                        if self.proto.state is ConnectionState.REMOTE_CLOSING:
                            self._close_from_remote(code, event.reason or "")
                        else:  # a framing error wsproto reported as a close
                            self.conn.close(code, event.reason or "protocol-error")
                        return
        except (RemoteProtocolError, LocalProtocolError) as exc:
            log.info("websocket protocol error: %s", exc)
            self.conn.close(1002, "protocol-error")
        finally:
            self.reader_done.set()
            if self.on_reader_done is not None:
                self.on_reader_done()

    async def _receive(self) -> bytes | None:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        return data or None

    async def _writer(self) -> None:
        conn = self.conn
        outbox = conn.outbox
        while True:
            self._wakeup = trio.Event()
            frames = outbox.take()
            if frames:
                self.drained = trio.Event()
                if not await self._send(frames):
                    return
                continue
            self.drained.set()
            if conn.closing is not None:
                break
            self._idle = True
            try:
                await self._wakeup.wait()
            finally:
                self._idle = False
        if self.lost:
            return
        code, reason = conn.closing
        try:
            if self.proto.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                frame = self.proto.send(CloseConnection(code=code, reason=reason))
                await self._send([frame])
        except LocalProtocolError:
            pass

    async def _send(self, frames: list[bytes | memoryview]) -> bool:
        """Write `frames`; False (and the connection marked lost) if the client stalled: no
        progress for `stall_seconds` (each chunk written pushes the deadline back)."""
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
        stall = self.config.stall_seconds
        with trio.move_on_after(stall) as scope:
            try:
                for chunk in chunks:
                    await self.stream.send_all(chunk)
                    scope.deadline = trio.current_time() + stall
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._close_from_remote(1006, "connection lost", lost=True)
                return False
            return True
        log.info("websocket client %s stalled; dropped", self.conn.number)
        self.conn.dropped_slow = True
        self.conn.close(CLOSE_CODES["too-slow"], "too-slow")
        self.lost = True
        return False


class _PeerSocket:
    """`HubWebSocket` over a `_Session` (see the Protocol)."""

    def __init__(
        self,
        session: _Session,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        remote: tuple[str, int] | None,
        slot: Slot | None = None,
    ) -> None:
        self._session = session
        self.path = path
        self.query = query
        self.headers = headers
        self.remote = remote
        self.slot = slot
        send, self._incoming = trio.open_memory_channel[bytes | str](64)
        self._send_incoming = send

    @property
    def closed(self) -> CloseReason | None:
        closing = self._session.conn.closing
        return CloseReason(closing[0], closing[1]) if closing is not None else None

    def _closed_error(self) -> ConnectionClosed:
        closing = self._session.conn.closing or (1006, "connection lost")
        return ConnectionClosed(CloseReason(closing[0], closing[1]))

    async def get_message(self) -> bytes | str:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None

    async def send_message(self, message: bytes | str) -> None:
        session = self._session
        conn = session.conn
        if conn.closing is not None:
            raise self._closed_error()
        while conn.outbox.nbytes > session.config.coalesce_bytes and conn.closing is None:
            await session.drained.wait()  # back-pressure: a daemon link waits for its reader
        if conn.closing is not None:
            raise self._closed_error()
        if isinstance(message, str):
            conn.send(ws_frame(message.encode("utf-8"), opcode=0x1))
        else:
            conn.send(ws_frame(bytes(message)))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self._session.conn.close(code, reason or "")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._session.reader_done.wait()


# --------------------------------------------------------------------------------- the server
@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubHttp:
    """Serves one accepted stream: `await hub_http.handle(stream)` (for `trio.serve_listeners`)."""

    def __init__(
        self,
        rooms: Rooms,
        accounts: Accounts,
        peer_endpoint: PeerEndpoint | None = None,
        *,
        config: HttpConfig | None = None,
        version: str = "",
        stats: Callable[[], dict[str, Any]] | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.events = events
        self.rooms = rooms
        self.accounts = accounts
        self.peer_endpoint: PeerEndpoint = peer_endpoint or NotAvailablePeerEndpoint()
        self.config = config or HttpConfig()
        self.version = version
        self.stats = stats
        self.peer_connections = 0
        self._next_conn = 1
        self.sessions: set[_Session] = set()
        self.admission = Admission(self.config.max_half_open, self.config.max_half_open_per_ip)
        """Connections not authenticated yet (every path), in total and per remote address."""
        self._refusing = 0

    async def keepalive(self) -> None:
        """Ping clients that have been silent for `ping_interval`; drop those silent for twice
        that (a laptop that went to sleep must not hold its device slot or awareness forever).
        One task for every connection: the sessions are swept, not timed one by one."""
        interval = self.config.ping_interval
        while True:
            await trio.sleep(interval / 2)
            now = trio.current_time()
            for session in list(self.sessions):
                idle = now - session.last_received
                if idle >= 2 * interval:
                    session.abort("timeout")
                elif idle >= interval:
                    session.ping()

    # -- entry -----------------------------------------------------------------------------------
    async def handle(self, stream: trio.abc.Stream) -> None:
        remote = _remote(stream)
        slot = self.admission.admit(remote[0] if remote is not None else "?")
        try:
            if slot is None:
                await self._refuse(stream, remote)
            else:
                await self._handle(stream, slot)
        except trio.TooSlowError:
            log.debug("hub connection from %s: no request head in time; closed", remote)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # one connection's failure never takes the hub down
            log.exception("hub connection failed")
        finally:
            if slot is not None:
                slot.release()
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await stream.aclose()

    async def _refuse(self, stream: trio.abc.Stream, remote: tuple[str, int] | None) -> None:
        """Over the half-open limits: `503 busy` and close, at once. The request head is read
        first (closing with it unread would reset the connection before the client reads the
        answer); while many are being refused, just hang up."""
        log.debug("hub connection from %s refused: busy", remote)
        if self._refusing >= self.config.max_half_open:
            await trio.aclose_forcefully(stream)
            return
        self._refusing += 1
        try:
            with trio.move_on_after(REFUSE_TIMEOUT):
                try:
                    await _read_head(stream)
                except (_BadRequest, EOFError):
                    pass
                await stream.send_all(BUSY_RESPONSE)
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.abc.Stream, slot: Slot) -> None:
        with trio.fail_after(self.config.head_timeout):  # the head, and the answer to it
            opened = await self._open(stream)
        if opened is None:
            slot.release()  # answered
            return
        request, leftover = opened
        deadline = trio.current_time() + self.config.handshake_timeout + CLOSE_TIMEOUT
        if request.path == "/peer":
            await self._serve_peer(stream, leftover, request, slot, deadline)
        else:
            space_id, doc_id = (unquote(p) for p in request.path[len("/yjs/") :].split("/"))
            await self._serve_yws(stream, leftover, request, space_id, doc_id, slot, deadline)

    async def _open(self, stream: trio.abc.Stream) -> tuple[_Request, bytes] | None:
        """Read the request head and answer it: plain HTTP and bad requests get their response
        (None), a websocket upgrade of `/yjs/SPACE/DOC` or `/peer` its `101` (the request and
        the bytes read past the head)."""
        try:
            head, leftover = await _read_head(stream)
            request = _parse_request(head)
        except _BadRequest as exc:
            await _respond(stream, exc.status, {"error": str(exc)})
            return None
        except EOFError:
            return None
        upgrade = request.headers.get("upgrade", "").lower() == "websocket"
        if not upgrade:
            if request.path == "/health" and request.method in ("GET", "HEAD"):
                await _respond(stream, 200, self.health(), head_only=request.method == "HEAD")
            else:
                await _respond(stream, 404, {"error": "not found"})
            return None
        if request.path.startswith("/yjs/"):
            parts = request.path[len("/yjs/") :].split("/")
            if len(parts) != 2 or not all(parts):
                await _respond(stream, 404, {"error": "expected /yjs/SPACE_ID/DOC_ID"})
                return None
        elif request.path != "/peer":
            await _respond(stream, 404, {"error": "not found"})
            return None
        if not await self._accept(stream, request):
            return None
        return request, leftover

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "ok",
            "version": self.version,
            "rooms": len(self.rooms.rooms),
            "clients": self.rooms.clients + self.peer_connections,
        }
        if self.stats is not None:
            out.update(self.stats())
        return out

    async def _accept(self, stream: trio.abc.Stream, request: _Request) -> bool:
        key = request.headers.get("sec-websocket-key", "")
        if (
            request.method != "GET"
            or "upgrade" not in request.headers.get("connection", "").lower()
            or request.headers.get("sec-websocket-version") != "13"
            or not key
        ):
            await _respond(stream, 400, {"error": "bad websocket upgrade request"})
            return False
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest())
        # No Sec-WebSocket-Extensions in the answer: permessage-deflate is declined.
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        return True

    def _new_conn(self) -> YConn:
        number = self._next_conn
        self._next_conn += 1
        c = self.config
        outbox = Outbox(ws_frame, coalesce_bytes=c.coalesce_bytes, limit_bytes=c.limit_bytes)
        return YConn(number, outbox)

    # -- y-websocket -----------------------------------------------------------------------------
    async def _serve_yws(
        self,
        stream: trio.abc.Stream,
        leftover: bytes,
        request: _Request,
        space_id: str,
        doc_id: str,
        slot: Slot,
        auth_deadline: float,
    ) -> None:
        conn = self._new_conn()
        session = _Session(stream, conn, leftover, self.config)
        lease = None
        accounts = self.accounts
        user = accounts.user_of(request.query.get("token", ""))
        if user is None:
            conn.deny("unauthorized")
        elif not accounts.can_access(user.name, space_id):
            conn.deny("forbidden")
        else:
            try:
                check_ids(space_id, doc_id)
                conn.user = user.name
                conn.token_hash = user.token_hash
                conn.space_id = space_id
                conn.device = request.query.get("device") or conn.origin
                lease = accounts.devices.acquire(user.name, conn.device)
            except LimitExceeded as exc:
                log.info("yws %d (%s): %s", conn.number, user.name, exc)
                conn.deny(exc.reason)
            except ValueError as exc:
                log.info("yws %d: %s", conn.number, exc)
                conn.deny("bad-request")
            else:
                self.rooms.join(space_id, doc_id, conn)
                slot.release()  # authenticated: no longer counts as half-open
        if conn.closing is not None:
            log.info("yws %d: refused: %s", conn.number, conn.closing[1])
        rooms = self.rooms

        def on_message(data: bytes | str) -> None:
            if isinstance(data, str):
                conn.close(CLOSE_CODES["protocol-error"], "protocol-error")
                return
            try:
                rooms.receive(conn, data)
            except Exception:
                log.exception("yws %d: message handling failed", conn.number)
                conn.close(1011, "internal-error")

        self.sessions.add(session)
        try:
            await session.run(on_message, slot=slot, auth_deadline=auth_deadline)
        finally:
            self.sessions.discard(session)
            rooms.leave(conn)
            if lease is not None:
                lease.release()
            if conn.dropped_slow:
                log.warning("yws %d (%s): dropped: too slow", conn.number, conn.user)
                if self.events is not None:
                    self.events.emit(
                        "client-dropped",
                        connection=conn.number,
                        user=conn.user,
                        space=space_id,
                        doc=doc_id,
                        reason="too-slow",
                    )

    def revalidate(self) -> int:
        """After an accounts change: deny connections whose token or access is gone."""
        cut = 0
        for conn in self.rooms.connections():
            user = self.accounts.user_of_hash(getattr(conn, "token_hash", ""))
            if user is None:
                conn.deny("unauthorized")
                cut += 1
            elif not self.accounts.can_access(user.name, getattr(conn, "space_id", "")):
                conn.deny("forbidden")
                cut += 1
        return cut

    # -- daemons ---------------------------------------------------------------------------------
    async def _serve_peer(
        self,
        stream: trio.abc.Stream,
        leftover: bytes,
        request: _Request,
        slot: Slot,
        auth_deadline: float,
    ) -> None:
        conn = self._new_conn()
        session = _Session(stream, conn, leftover, self.config)
        ws = _PeerSocket(
            session, request.path, request.query, request.headers, _remote(stream), slot
        )
        send = ws._send_incoming
        session.on_reader_done = send.close  # get_message raises ConnectionClosed after the rest

        async def on_message(data: bytes | str) -> None:
            try:
                await send.send(data)  # back-pressure: the reader waits for the handler
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async def handler() -> None:
            try:
                await self.peer_endpoint.handle_peer(ws)
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("peer connection from %s failed", ws.remote)
                conn.close(1011, "internal-error")
            finally:
                conn.close(1000, "")
                ws._incoming.close()

        self.peer_connections += 1
        self.sessions.add(session)
        try:
            await session.run(on_message, handler, slot=slot, auth_deadline=auth_deadline)
        finally:
            self.sessions.discard(session)
            self.peer_connections -= 1


# ------------------------------------------------------------------------------ HTTP helpers
async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
        if len(buf) > MAX_HEAD:
            raise _BadRequest(431, "request head too large")
        data = await stream.receive_some(16384)
        if not data:
            raise EOFError
        buf += data


def _parse_request(head: bytes) -> _Request:
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        raise _BadRequest(400, f"bad request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise _BadRequest(400, "bad request")
    target = event.target.decode("ascii", "replace")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return _Request(
        event.method.decode("ascii", "replace"),
        parts.path,
        dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers,
    )


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 431: "Request Header Fields Too Large"}


async def _respond(
    stream: trio.abc.Stream, status: int, body: dict[str, Any], *, head_only: bool = False
) -> None:
    data = (json.dumps(body) + "\n").encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    await stream.send_all(head if head_only else head + data)


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """A duplicate of a plain TCP stream's socket (same non-blocking file description), for
    `_Session.wake`'s immediate writes; None under TLS."""
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        return socket.socket(fileno=os.dup(stream.socket.fileno()))
    except OSError:
        return None


def _remote(stream: trio.abc.Stream) -> tuple[str, int] | None:
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
