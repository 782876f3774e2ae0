"""The trio shell of one peer connection: moves websocket messages in and out of a
`PeerConnection`, applies the updates it reports, and sleeps until its timer. All protocol
decisions live in `session.py`.

Three tasks per `Link`: a reader (websocket -> `receive`), a writer (`data_to_send` ->
websocket, woken whenever the connection may have something to send; it tells the connection
`sending(now)` / `sent()` so that the core can judge a stalled write) and a ticker
(`handle_timer` at `get_timer()`). Over our own websocket (`core.wsstream.WebSocket`: `dial`,
`serve`) the writer is needed only when the socket is full: whatever queues a message (a local
change, a received step 1) writes it at once from its own task while the socket takes all of
it, and the reader reads the socket itself. That saves a LAN hop the task switches of
trio-websocket (a reader task and a channel on receive, a lock and the writer's wake-up on
send). Any object with trio-websocket's `get_message`, `send_message` and `aclose` still works
(the hub's `PeerSocket`, trio-websocket's own), through the writer task.
After every input the link drains the connection's events:
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
from typing import Any

import trio
import trio_websocket

from ..core.admission import BUSY_BODY, BUSY_STATUS, Admission, Slot
from ..core.websocket import ConnectionClosed, HandshakeFailed, Rejected
from ..core.wsstream import WebSocket, connect, read_upgrade
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


_CLOSED = (ConnectionClosed, trio_websocket.ConnectionClosed)
"""What a websocket's methods raise once it is closed: ours, or trio-websocket's (whose
exception the hub's `PeerSocket` raises too)."""


def _lost_reason(exc: ConnectionClosed | trio_websocket.ConnectionClosed) -> str:
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
        self._ws: WebSocket | None = None
        """Our own websocket, which `_send_now` writes to from the caller's task."""
        self._send_error: ConnectionClosed | None = None
        """A send from `_send_now` found the websocket closed: the writer reports it."""
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
        """Queue presence for the peer, and write it at once if the socket takes it (else
        wake the writer); never drains events: it is called from inside other links' (and
        this link's) event handling."""
        if self.conn is not None and self.conn.send_awareness(doc, payload):
            if not self._send_now():
                self._wakeup.set()
            self._retime()

    def close(self, reason: str, detail: str = "") -> None:
        if self.conn is not None:
            self.conn.close(reason, detail)
            self._pump()

    # -- the tasks -----------------------------------------------------------------------------

    async def run(self, ws: Any) -> Closed:
        """Drive the connection over `ws` (a `WebSocket`, or anything with trio-websocket's
        `get_message`, `send_message` and `aclose`) until it is closed; returns why."""
        conn = self._make_conn(trio.current_time())
        sink = self._host if self._host is not None else conn.host
        if not isinstance(sink, UpdateSink):
            raise TypeError(f"{sink!r} cannot apply updates: give the Link a host")
        self.conn, self._sink = conn, sink
        self._ws = ws if isinstance(ws, WebSocket) else None
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
        if conn.wants_write and not self._send_now():
            self._wakeup.set()
        self._retime()

    def _send_now(self) -> bool:
        """Write what the connection has queued from this task, with no task switch, while
        our websocket's socket takes all of it. False: the writer has to go on (the socket is
        full, the connection closed, or `ws` is another kind of websocket). Taking more only
        once the socket took everything keeps the queue in the connection, which bounds and
        merges it (`too-slow`)."""
        ws, conn = self._ws, self.conn
        if ws is None or conn is None or conn.closed is not None or ws.pending:
            return False
        try:
            while batch := conn.data_to_send():
                for data in batch:
                    ws.send_nowait(data)
                    self.bytes_sent += len(data)
                    self.messages_sent += 1
                if ws.pending:
                    conn.sending(trio.current_time())  # the writer watches it drain
                    return False
        except ConnectionClosed as exc:
            self._send_error = exc
            return False
        return True

    def _retime(self) -> None:
        """Wake the ticker if the connection's timer is now earlier than what it sleeps until
        (or the connection closed); a later one it finds on waking."""
        conn = self.conn
        timer = conn.get_timer() if conn is not None else None
        if timer is None or timer < self._tick_at:
            self._tick.set()

    async def _flush(self, ws: Any) -> bool:
        """Send what the connection has queued; False if the websocket is gone."""
        if self._ws is not None:
            return await self._flush_ws(self._ws)
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
                    except _CLOSED as exc:
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

    async def _flush_ws(self, ws: WebSocket) -> bool:
        """`_flush` over our websocket: hand it the connection's messages whenever nothing is
        pending, and watch what is pending drain (each write that takes some is progress)."""
        conn = self.conn
        assert conn is not None
        try:
            if self._send_error is not None:
                raise self._send_error
            while True:
                if ws.pending:
                    conn.sending(trio.current_time())
                    self._retime()  # the ticker may have to wait for the stall deadline
                    await ws.wait_progress()
                    continue
                batch = conn.data_to_send()
                if not batch:
                    break
                for data in batch:
                    ws.send_nowait(data)
                    self.bytes_sent += len(data)
                    self.messages_sent += 1
        except ConnectionClosed as exc:
            conn.connection_lost(_lost_reason(exc))
            self._pump()
            return False
        finally:
            if not ws.pending:
                conn.sent()
        return True

    async def _writer(self, ws: Any) -> None:
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

    async def _reader(self, ws: Any) -> None:
        conn = self.conn
        assert conn is not None
        while conn.closed is None:
            try:
                data = await ws.get_message()
            except _CLOSED as exc:
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
    and a path prefix (`tls`, `path`). The TCP connection and the upgrade together are bounded
    by `connect_timeout` (a listener that accepts TCP and never answers is `unreachable`).
    """
    outcome: Closed | Unreachable
    async with trio.open_nursery() as nursery:  # where the websocket's writer runs, if needed
        outcome = await _dial_in(nursery, link, host, port, path, tls)
        nursery.cancel_scope.cancel()
    if isinstance(outcome, Unreachable):
        raise outcome  # (outside the nursery, which would wrap it in a group)
    return outcome


async def _dial_in(
    nursery: trio.Nursery, link: Link, host: str, port: int, path: str, tls: bool
) -> Closed | Unreachable:
    config = link.config
    ws: WebSocket | None = None
    try:
        with trio.move_on_after(config.connect_timeout):
            ws = await connect(
                host,
                port,
                path,
                nursery.start_soon,
                max_message=config.max_message,
                ssl_context=ssl.create_default_context() if tls else None,
                close_timeout=config.close_grace,
            )
    except (HandshakeFailed, OSError, trio.BrokenResourceError) as exc:
        busy = (
            isinstance(exc, Rejected) and exc.status_code == BUSY_STATUS and exc.body == BUSY_BODY
        )
        return Unreachable(
            f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
            BUSY if busy else UNREACHABLE,
        )
    if ws is None:
        return Unreachable(
            f"no websocket handshake within {config.connect_timeout:g} s", UNREACHABLE
        )
    try:
        return await link.run(ws)
    except _TRANSPORT_ERRORS as exc:
        if link.closed is not None:
            return link.closed  # a failure while hanging up: the link had already ended
        return Unreachable(f"{type(exc).__name__}: {exc}", UNREACHABLE)
    finally:
        with trio.move_on_after(config.close_grace) as scope:
            scope.shield = True
            await ws.aclose()


_TRANSPORT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    ConnectionClosed,
    trio_websocket.ConnectionClosed,
    HandshakeFailed,
)


def _transport_failure(exc: BaseException) -> bool:
    """Whether `exc` (or every leaf of an exception group) is a connection that went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_transport_failure(e) for e in exc.exceptions)
    return isinstance(exc, _TRANSPORT_ERRORS)


def remote_address(ws: Any) -> str:
    """`host:port` of the other end, or "?" once it is gone (`ws.remote`: a `(host, port)`, or
    trio-websocket's endpoint, which asks the socket and raises ENOTCONN after a reset: a log
    line must not end the listener)."""
    try:
        remote = ws.remote
    except OSError:
        return "?"
    if remote is None:
        return "?"
    if isinstance(remote, tuple):
        return format_address(str(remote[0]), int(remote[1]))
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
    handler: Callable[[WebSocket, Slot], Awaitable[None]],
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
                upgrade = await read_upgrade(stream)
                await upgrade.refuse(BUSY_STATUS, BUSY_BODY)
        finally:
            refusing -= 1
            await trio.aclose_forcefully(stream)

    async def on_connection(stream: trio.abc.Stream) -> None:
        """(`serve_tcp` closes the stream once this returns.)"""
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
            upgrade = None
            with trio.move_on_after(config.connect_timeout):
                upgrade = await read_upgrade(stream)
                if upgrade.request.path != PATH:
                    await upgrade.refuse(404, b"not a peerdaemon peer endpoint\n")
                    return
            if upgrade is None:
                await trio.aclose_forcefully(stream)
                return
            async with trio.open_nursery() as nursery:  # the websocket's writer, if needed
                ws = await upgrade.accept(
                    nursery.start_soon,
                    max_message=config.max_message,
                    close_timeout=config.close_grace,
                )
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
