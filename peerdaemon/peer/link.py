"""The trio shell of one peer connection: moves websocket messages in and out of a
`PeerConnection`, applies the updates it reports, and sleeps until its timer. All protocol
decisions live in `session.py`.

Three tasks per `Link`: a reader (websocket -> `receive`), a writer (`data_to_send` ->
websocket, woken whenever the connection may have something to send; it tells the connection
`sending(now)` / `sent()` so that the core can judge a stalled write) and a ticker
(`handle_timer` at `get_timer()`). After every input the link drains the connection's events:
an `UpdateReceived` is applied through the link's host at once (`apply_update`), before the next
message is read, and every other event goes to the owner's `on_event`. Once the connection is
closed the writer flushes the close message and hangs up; if a send is stuck (a peer that
stopped reading), the ticker cuts the connection after `close_grace`.

Nothing here ever waits for a peer on behalf of the code producing changes: `local_update` only
queues (the connection bounds its queue: merged past `coalesce_bytes`, `too-slow` past
`max_queued`, and closes with `too-slow` a write that makes no progress for `send_timeout`).

`serve` bounds the incoming connections that have not authenticated yet (`Admission`, shared
with the hub: `admission.py`): in total and per remote address, from the TCP accept to
`Established`. One more is refused at once with an HTTP 503 `busy` instead of the websocket
upgrade, which a dialer reports as `busy`.
"""

from __future__ import annotations

import itertools
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket,
    wrap_server_stream,
)

from ..core.admission import BUSY_BODY, BUSY_STATUS, Admission, Slot
from .config import PeerConfig
from .messages import BUSY, CLOSED, SHUTDOWN, TOO_LARGE, UNREACHABLE
from .session import Closed, Event, PeerConnection, UpdateReceived, UpdateSink, apply_update

__all__ = [
    "PATH",
    "Admission",
    "Link",
    "Slot",
    "Unreachable",
    "dial",
    "format_address",
    "remote_address",
    "serve",
]

log = logging.getLogger("peerdaemon.peer")

PATH = "/peer"
RECEIVE_BUFFER = 256 * 1024
WS_MESSAGE_TOO_BIG = 1009
SHUTDOWN_FLUSH = 0.5
"""How long a link cancelled by a daemon shutdown may spend telling the peer."""
REFUSE_TIMEOUT = 1.0
"""How long refusing one connection over the limits may take (reading its HTTP request)."""


class Unreachable(Exception):
    """The TCP connection or the websocket opening handshake of a dial failed (`reason`
    `busy` if the listener refused it for having too many connections in their handshake)."""

    def __init__(self, message: str, reason: str = UNREACHABLE) -> None:
        super().__init__(message)
        self.reason = reason


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _lost_reason(exc: ConnectionClosed) -> str:
    reason = exc.reason
    return TOO_LARGE if reason is not None and reason.code == WS_MESSAGE_TOO_BIG else CLOSED


_numbers = itertools.count(1)


class Link:
    """One websocket connection driving one `PeerConnection`.

    Updates the connection reports (`UpdateReceived`) are applied through `host` (default: the
    host the connection reads, when it is a whole `SyncHost`) and their outcome reported back.
    `on_event(link, event)` is called synchronously, on the trio thread, for every other event
    of the connection (`HelloReceived`, `Established`, `Synced`, `DocError`, `DocFailed`,
    `Closed`), in order.
    """

    def __init__(
        self,
        make_conn: Callable[[float], PeerConnection],
        *,
        dialer: bool,
        address: str,
        on_event: Callable[[Link, Event], None],
        config: PeerConfig,
        host: UpdateSink | None = None,
    ) -> None:
        self._make_conn = make_conn
        self.dialer = dialer
        self.address = address
        self._on_event = on_event
        self.config = config
        self._host = host
        self._sink: UpdateSink | None = None
        self.conn: PeerConnection | None = None
        self.target: object | None = None
        """The owner's tag for a dialed link (the manager's dial target)."""
        self.slot: Slot | None = None
        """An incoming link's place among the unauthenticated connections (`serve`)."""
        self.started = trio.current_time()
        self._wakeup = trio.Event()
        self._tick = trio.Event()
        self._tick_at = math.inf
        """The deadline the ticker sleeps until: it is woken only for an earlier one."""
        self._cancel: trio.CancelScope | None = None
        self.number = next(_numbers)
        """This link's serial number (a presence `source` names one link: `awareness_source`)."""
        self.bytes_sent = 0
        self.bytes_received = 0
        """Websocket message payload bytes (the protocol's CBOR messages), both directions."""
        self.messages_sent = 0
        self.messages_received = 0

    def __repr__(self) -> str:
        role = "dialer" if self.dialer else "listener"
        return f"<Link {role} {self.address} {self.peer_device or '?'}>"

    @property
    def peer_device(self) -> str | None:
        return self.conn.peer_device if self.conn is not None else None

    @property
    def closed(self) -> Closed | None:
        return self.conn.closed if self.conn is not None else None

    @property
    def awareness_source(self) -> str:
        """The presence source of this link: its origin and serial (`AwarenessHost`)."""
        conn = self.conn
        origin = conn.origin if conn is not None else None
        return f"{origin or f'peer:{self.peer_device}'}#{self.number}"

    # -- called by the manager -----------------------------------------------------------------

    def local_update(self, doc: str, update: bytes, origin: str) -> None:
        if self.conn is not None:
            self.conn.local_update(doc, update, origin)
            self._pump()

    def docs_changed(self) -> None:
        if self.conn is not None:
            self.conn.docs_changed()
            self._pump()

    def send_awareness(self, doc: str, payload: bytes) -> None:
        """Queue presence for the peer. Only wakes the writer, never drains events: it is
        called from inside other links' (and this link's) event handling."""
        if self.conn is not None and self.conn.send_awareness(doc, payload):
            self._wakeup.set()
            self._retime()

    def close(self, reason: str, detail: str = "") -> None:
        if self.conn is not None:
            self.conn.close(reason, detail)
            self._pump()

    # -- the tasks -----------------------------------------------------------------------------

    async def run(self, ws: WebSocketConnection) -> Closed:
        """Drive the connection until it is closed; returns why."""
        conn = self._make_conn(trio.current_time())
        sink = self._host if self._host is not None else conn.host
        if not isinstance(sink, UpdateSink):
            raise TypeError(f"{sink!r} cannot apply updates: give the Link a host")
        self.conn, self._sink = conn, sink
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._reader, ws)
                nursery.start_soon(self._ticker)
                await self._writer(ws)
                nursery.cancel_scope.cancel()
        finally:
            if conn.closed is None:  # cancelled from outside: the daemon is stopping
                conn.close(SHUTDOWN)
                self._pump()
                with trio.move_on_after(SHUTDOWN_FLUSH) as scope:
                    scope.shield = True
                    await self._flush(ws)
                    await ws.aclose()
        assert conn.closed is not None
        return conn.closed

    def _pump(self) -> None:
        """Apply the updates the connection reports, hand its other events to the owner, and
        wake the writer if there is something to write and the ticker if its deadline came
        closer. (Waking them for nothing costs each message two task switches, which run
        before whatever the message woke: the socket subscriber's write, our own send.)"""
        conn = self.conn
        if conn is None:
            return
        while (event := conn.next_event()) is not None:
            if type(event) is UpdateReceived:
                assert self._sink is not None
                apply_update(conn, event, self._sink)
                continue
            try:
                self._on_event(self, event)
            except Exception:  # the manager's bookkeeping must not kill the link's tasks
                log.exception("peer event handler failed for %r", event)
        if conn.wants_write:
            self._wakeup.set()
        self._retime()

    def _retime(self) -> None:
        """Wake the ticker if the connection's timer is now earlier than what it sleeps until
        (or the connection closed); a later one it finds on waking."""
        conn = self.conn
        timer = conn.get_timer() if conn is not None else None
        if timer is None or timer < self._tick_at:
            self._tick.set()

    async def _flush(self, ws: WebSocketConnection) -> bool:
        """Send what the connection has queued; False if the websocket is gone."""
        conn = self.conn
        assert conn is not None
        writing = False
        try:
            while batch := conn.data_to_send():
                if not writing:
                    writing = True
                    conn.sending(trio.current_time())
                    self._retime()  # the ticker may have to wait for the stall deadline
                for data in batch:
                    try:
                        await ws.send_message(data)
                    except ConnectionClosed as exc:
                        conn.connection_lost(_lost_reason(exc))
                        self._pump()
                        return False
                    conn.sending(trio.current_time())  # progress
                    self.bytes_sent += len(data)
                    self.messages_sent += 1
        finally:
            if writing:
                conn.sent()
        return True

    async def _writer(self, ws: WebSocketConnection) -> None:
        conn = self.conn
        assert conn is not None
        while True:
            self._wakeup = trio.Event()
            if not await self._flush(ws):
                return
            if conn.closed is not None:
                # Closed while that flush was sending (the reader got a bad message): the close
                # message was queued after the flush took its batch, so send it too.
                if not await self._flush(ws):
                    return
                break
            await self._wakeup.wait()
        with trio.move_on_after(self.config.close_grace):
            await ws.aclose(1000, conn.closed.reason)

    async def _reader(self, ws: WebSocketConnection) -> None:
        conn = self.conn
        assert conn is not None
        while conn.closed is None:
            try:
                data = await ws.get_message()
            except ConnectionClosed as exc:
                conn.connection_lost(_lost_reason(exc))
                self._pump()
                return
            self.bytes_received += len(data)
            self.messages_received += 1
            conn.receive(data, trio.current_time())
            self._pump()

    async def _ticker(self) -> None:
        conn = self.conn
        assert conn is not None
        while conn.closed is None:
            deadline = conn.get_timer()
            if deadline is None:
                deadline = math.inf
            self._tick = trio.Event()
            self._tick_at = deadline
            with trio.move_on_at(deadline):
                await self._tick.wait()
            if conn.closed is not None:
                break
            now = trio.current_time()
            if now >= deadline:
                conn.handle_timer(now)
                self._pump()
        await trio.sleep(self.config.close_grace)
        if self._cancel is not None:
            self._cancel.cancel()


async def dial(link: Link, host: str, port: int, *, path: str = PATH, tls: bool = False) -> Closed:
    """Open a websocket to `host:port` and run `link` over it; `Unreachable` if it never opens.

    LAN peers use plain websockets on `/peer` (the protocol encrypts); a hub may sit behind TLS
    and a path prefix (`tls`, `path`).
    """
    config = link.config
    opened = False
    try:
        # trio-websocket's own connect_timeout raises but then waits for its reader task, which
        # never ends if the other side accepts TCP and stays silent (0.12.2): bound the opening
        # here, and lift the bound once the websocket is open
        with trio.CancelScope(deadline=trio.current_time() + config.connect_timeout) as opening:
            async with open_websocket(
                host,
                port,
                path,
                use_ssl=ssl.create_default_context() if tls else False,
                max_message_size=config.max_message,
                receive_buffer_size=RECEIVE_BUFFER,
                connect_timeout=config.connect_timeout,
                disconnect_timeout=config.close_grace,
            ) as ws:
                opened = True
                opening.deadline = math.inf
                return await link.run(ws)
        raise Unreachable(
            f"no websocket handshake within {config.connect_timeout:g} s", UNREACHABLE
        )
    except (HandshakeError, OSError, ConnectionClosed, trio.BrokenResourceError) as exc:
        if opened and link.closed is not None:
            return link.closed  # a failure while hanging up: the link had already ended
        busy = (
            isinstance(exc, ConnectionRejected)
            and exc.status_code == BUSY_STATUS
            and exc.body == BUSY_BODY
        )
        raise Unreachable(
            f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
            BUSY if busy else UNREACHABLE,
        ) from None


_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, ConnectionClosed, HandshakeError)


def _transport_failure(exc: BaseException) -> bool:
    """Whether `exc` (or every leaf of an exception group) is a connection that went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_transport_failure(e) for e in exc.exceptions)
    return isinstance(exc, _TRANSPORT_ERRORS)


def remote_address(ws: WebSocketConnection) -> str:
    """`host:port` of the other end, or "?" once it is gone: `ws.remote` asks the socket, which
    raises ENOTCONN after a reset, and a log line must not end the listener."""
    try:
        remote = ws.remote
    except OSError:
        return "?"
    return remote if isinstance(remote, str) else format_address(str(remote.address), remote.port)


def _remote_ip(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "?"
    except (OSError, IndexError, TypeError):
        return "?"


async def serve(
    host: str,
    port: int,
    handler: Callable[[WebSocketConnection, Slot], Awaitable[None]],
    config: PeerConfig,
    *,
    admission: Admission | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `host:port` for peers (websocket path `/peer`); started() with the bound port.

    `handler(ws, slot)` runs each admitted connection; it releases `slot` once the peer has
    authenticated (it is released when the handler returns in any case). Connections over the
    `admission` limits (default: `config.max_half_open` and `max_half_open_per_ip`) are refused.
    """
    if admission is None:
        admission = Admission(config.max_half_open, config.max_half_open_per_ip)
    refusing = 0

    async def refuse(stream: trio.abc.Stream) -> None:
        """HTTP 503 `busy` in place of the upgrade; while many are being refused, just hang up."""
        nonlocal refusing
        if refusing >= config.max_half_open:
            await trio.aclose_forcefully(stream)
            return
        refusing += 1
        try:
            with trio.move_on_after(min(REFUSE_TIMEOUT, config.connect_timeout)):
                async with trio.open_nursery() as nursery:
                    request = await wrap_server_stream(
                        nursery, stream, max_message_size=config.max_message
                    )
                    await request.reject(BUSY_STATUS, body=BUSY_BODY)
                    nursery.cancel_scope.cancel()
        finally:
            refusing -= 1
            await trio.aclose_forcefully(stream)

    async def on_connection(stream: trio.abc.Stream) -> None:
        try:
            await serve_one(stream)
        except Exception as exc:  # one bad connection must not stop the listener
            if _transport_failure(exc):  # the other end reset or vanished mid-handshake
                log.debug("peer connection from %s dropped: %r", _remote_ip(stream), exc)
            else:
                log.exception("peer connection from %s failed", _remote_ip(stream))

    async def serve_one(stream: trio.abc.Stream) -> None:
        slot = admission.admit(_remote_ip(stream))
        if slot is None:
            log.debug("peer connection from %s refused: busy", _remote_ip(stream))
            await refuse(stream)
            return
        try:
            async with trio.open_nursery() as nursery:
                request: WebSocketRequest | None = None
                with trio.move_on_after(config.connect_timeout):
                    request = await wrap_server_stream(
                        nursery,
                        stream,
                        max_message_size=config.max_message,
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
                    if request.path != PATH:
                        await request.reject(404, body=b"not a peerdaemon peer endpoint\n")
                        request = None
                if request is None or request.path != PATH:
                    nursery.cancel_scope.cancel()
                    await trio.aclose_forcefully(stream)
                    return
                ws = await request.accept()
                try:
                    await handler(ws, slot)
                except Exception:  # one bad connection must not stop the listener
                    log.exception("peer connection from %s failed", remote_address(ws))
                finally:
                    with trio.move_on_after(config.close_grace):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            slot.release()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, port, host=host))
        sockname = listeners[0].socket.getsockname() if listeners else None
        task_status.started(sockname[1] if sockname else port)
