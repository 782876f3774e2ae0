"""The hub's port at the byte level: one HTTP/1.1 request and its answer (h11), the websocket
upgrade (RFC 6455's checks on h11's head), and the task that moves one websocket's bytes
(`WebSocketTransport`). Nothing here decides what bytes mean or when to give up: h11 and
`WsConn` (wsconn.py) do; this module reads, writes and waits for their deadlines.

Why writes go out from wherever frames were queued: fan-out. A broadcast puts the same frame
bytes in every recipient's outbox; `wake()` then writes an idle connection's frames at once with
one non-blocking `write()` on its socket (`writev()` for several buffers: no task switch per
recipient, no copy). Only what the socket does not take starts a writer task (and under TLS,
everything does).

Why one task per connection, and shared timers: an idle hub holds thousands of connections, and
whatever a waiting connection keeps alive (a task, a nursery, a cancel scope, an event, the
stream's wrappers) counts thousands of times (docs/hub.md, "Storage").
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from ..core.streams import socket_fd
from ..core.streams import stream_remote as remote_address
from .wsconn import WsConn

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_HEAD",
    "BadRequest",
    "HttpExchange",
    "Request",
    "Upgraded",
    "Timers",
    "WebSocketTransport",
    "remote_address",
]

log = logging.getLogger("peerdaemon.hub.transport")

MAX_HEAD = 16 * 1024
"""The largest request head accepted (a larger one gets 431)."""
RECEIVE_SIZE = 256 * 1024
SEND_CHUNK = 1 << 20
"""The writer hands the socket at most this much at a time: each chunk taken is progress."""
IOV_MAX = 1024
"""Buffers handed to one `writev()` at most (POSIX's minimum for IOV_MAX is 16; Linux and
macOS take 1024)."""
CLOSE_TIMEOUT = 2.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
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
        """Accept a websocket upgrade of `request` (sends the `101`): RFC 6455's checks, as
        wsproto's handshake makes them, done here on the head h11 already parsed rather than by
        parsing it a second time (every connection of a burst pays for it). permessage-deflate
        is declined (no extensions), so every client can be sent the very same frame bytes.
        `BadRequest` if the upgrade request is not valid."""
        headers = request.headers
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        version = headers.get("sec-websocket-version")
        key = headers.get("sec-websocket-key")
        if request.method != "GET" or "upgrade" not in connection:
            raise BadRequest(400, "bad websocket upgrade request")
        if version != "13":
            raise BadRequest(
                426 if version else 400,
                "bad websocket upgrade request",
                [(b"Sec-WebSocket-Version", b"13")],
            )
        if not key or headers.get("upgrade", "").lower() != "websocket" or "host" not in headers:
            raise BadRequest(400, "bad websocket upgrade request")
        accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + WS_GUID).digest())
        await self.stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        return Upgraded(request, self._leftover())

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
Spawn = Callable[..., object]
"""`spawn(async_fn)`: start a task (a nursery's `start_soon`)."""


class WebSocketTransport:
    """Moves one websocket's bytes between a trio stream and its `WsConn`.

    One task per connection: the one calling `run` reads, and sleeps in its read until the
    core's deadline. Writing needs no task while the socket takes what it is given: `wake()`
    writes at once (see the module's docstring); only output the socket holds back starts a
    writer task, which ends once it is written (in `spawn`, else in the connection's own
    nursery). Its deadlines are kept by `Timers` when it has them (a plain socket on the hub's
    port), else by a cancel scope around each read."""

    __slots__ = (
        "stream",
        "core",
        "leftover",
        "on_reader_done",
        "_spawn",
        "_fd",
        "_writing",
        "_hung_up",
        "_done",
        "_close_by",
        "_read_scope",
        "_scope",
        "_drained",
        "_reader_done",
        "_timers",
        "_scheduled",
        "_waiting",
        "__weakref__",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        core: WsConn,
        leftover: bytes = b"",
        spawn: Spawn | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.stream = stream
        self.core = core
        self.leftover = leftover
        self.on_reader_done: Callable[[], None] | None = None
        self._spawn = spawn
        self._fd = socket_fd(stream)  # -1: every write goes through a writer task (TLS)
        self._writing = False  # a writer task is at work
        self._hung_up = False  # end now: cut, lost while writing, or stalled
        self._done = False  # the reader ended: nothing more is written
        self._close_by = math.inf  # once our close frame is out: hang up by then
        self._read_scope: trio.CancelScope | None = None
        self._scope: trio.CancelScope | None = None  # the connection's own nursery, if any
        self._drained: trio.Event | None = None
        self._reader_done: trio.Event | None = None
        self._timers = timers if self._fd >= 0 else None  # else: a cancel scope on each read
        self._scheduled = math.inf  # the earliest deadline `_timers` holds for this connection
        self._waiting = False  # blocked in `wait_readable` (shared timers)

    @property
    def number(self) -> int:
        return self.core.outlet.number

    @property
    def drained(self) -> trio.Event:
        """Set once nothing waits to be written (for a sender that waits for its reader)."""
        if self._writing:
            if self._drained is None:
                self._drained = trio.Event()
            return self._drained
        event = trio.Event()
        event.set()
        return event

    @property
    def reader_done(self) -> trio.Event:
        if self._reader_done is None:
            self._reader_done = trio.Event()
            if self._done:
                self._reader_done.set()
        return self._reader_done

    # -- output ----------------------------------------------------------------------------------
    def wake(self) -> None:
        """The connection has something to write: it goes out right here with one non-blocking
        write (no task switch, no trio wrapper: that is what makes a broadcast to hundreds of
        clients cheap); only what the socket did not take starts a writer task."""
        if self._writing or self._done or self.core.lost:
            return
        if self._fd >= 0 and self._write_now():
            if self.core.outlet.closing is not None:
                self._after_write()
            return
        if self._hung_up:
            return
        self._writing = True
        if self._spawn is not None:
            self._spawn(self._writer)
        else:
            self._writing = False  # no nursery yet (before `run`): `run` writes what waits

    def _write_now(self) -> bool:
        """Write what is queued without waiting; False if some is left (the socket is full)."""
        core = self.core
        while frames := core.data_to_send():  # the close frame comes once the rest is out
            try:
                if len(frames) == 1:
                    sent = os.write(self._fd, frames[0])
                else:
                    sent = os.writev(self._fd, frames[:IOV_MAX])
            except BlockingIOError:
                sent = 0
            except OSError:  # broken: no close frame can go out any more
                core.connection_lost()
                self._hang_up()
                return False
            if len(frames) > 1 or sent < len(frames[0]):
                rest = _unsent(frames, sent)
                if rest:
                    core.put_back(rest)
                    return False
            if core.outlet.closing is None:
                return True  # (only a close frame could follow)
        return True

    async def _writer(self) -> None:
        """Write until nothing is queued (or the connection is lost or too slow)."""
        core = self.core
        try:
            while not core.lost and not self._done:
                frames = core.data_to_send()
                if not frames:
                    break
                if not await self._send(frames):
                    self._hang_up()
                    break
        except Exception:  # never takes down the nursery it runs in
            log.exception("websocket %s: writing failed", self.number)
            core.connection_lost()
            self._hang_up()
        finally:
            self._writing = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None
        self._after_write()

    def _after_write(self) -> None:
        """Our close frame is out: the client has `CLOSE_TIMEOUT` to answer it."""
        if self.core.finished and self._close_by == math.inf:
            self._close_by = trio.current_time() + CLOSE_TIMEOUT
            if self._read_scope is not None:
                self._read_scope.deadline = min(self._read_scope.deadline, self._close_by)
            self._schedule()

    def _hang_up(self) -> None:
        self._hung_up = True
        if self._read_scope is not None:
            self._read_scope.cancel()
        if self._scope is not None:
            self._scope.cancel()
        if self._waiting:  # wakes the reader's `wait_readable` (ClosedResourceError)
            self._waiting = False
            trio.lowlevel.notify_closing(self._fd)

    # -- time (shared timers) ------------------------------------------------------------------
    def _schedule(self) -> None:
        """Make sure `_timers` calls `on_timer` by the core's next deadline."""
        if self._timers is None or self._done:
            return
        deadline = min(self.core.get_timer(), self._close_by)
        if deadline < self._scheduled:
            self._scheduled = deadline
            self._timers.add(deadline, self)

    def on_timer(self, now: float) -> None:
        """`_timers` says a deadline this connection gave it has come (it may have moved on:
        a message arrived since, which puts the keep-alive further off)."""
        self._scheduled = math.inf
        if self._done or self._hung_up:
            return
        if now >= self._close_by:
            self._hang_up()  # the client did not answer our close in time
            return
        if now >= self.core.get_timer():
            self.core.handle_timer(now)  # a ping, a cut, a handshake deadline
            self._after_core()
        if self.core.lost:
            self._hang_up()
            return
        self._schedule()

    def _after_core(self) -> None:
        """After the core was fed input or time: hang up if it cut the client, else let what
        it queued (a pong, a ping, a close) go out."""
        if self.core.cut:
            self._hang_up()
            return
        outlet = self.core.outlet
        if outlet.closing is not None or len(outlet.outbox):
            self.wake()

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

    # -- the connection's task ---------------------------------------------------------------------
    async def run(
        self, on_message: OnMessage, handler: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Read until the connection is over. `handler` (the /peer endpoint) runs beside, and
        may finish its own close within `CLOSE_TIMEOUT`."""
        try:
            if handler is None and self._spawn is not None:
                self.wake()  # what was queued before (the server speaks first)
                if self._timers is not None:
                    await self._read_fd(on_message)  # (one coroutine less per idle connection)
                else:
                    await self._read(on_message)
                await self._flush()
                return
            async with trio.open_nursery() as nursery:
                self._spawn = nursery.start_soon
                self._scope = nursery.cancel_scope
                handler_done = trio.Event()

                async def run_handler() -> None:
                    try:
                        assert handler is not None
                        await handler()
                    finally:
                        handler_done.set()

                if handler is not None:
                    nursery.start_soon(run_handler)
                self.wake()  # anything queued before the nursery was there
                if self._timers is not None:
                    await self._read_fd(on_message)
                else:
                    await self._read(on_message)
                await self._flush()
                if handler is not None:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await handler_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._done = True
            self._fd = -1  # the descriptor's number may be reused once the stream is closed
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _flush(self) -> None:
        """What is still being written (the answer to the client's close) gets its chance."""
        if self._writing and not self._hung_up and not self.core.lost:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.drained.wait()

    async def _read(self, on_message: OnMessage) -> None:
        """The reader of any stream: each read under a cancel scope with the core's deadline."""
        core = self.core
        try:
            await self._take_leftover(on_message)
            while not core.input_ended and not self._hung_up:
                data: bytes | None = None
                with trio.move_on_at(min(core.get_timer(), self._close_by)) as scope:
                    self._read_scope = scope
                    try:
                        data = await self._receive()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        data = b""
                self._read_scope = None
                if not scope.cancelled_caught:
                    core.receive_data(data or None, trio.current_time())
                    await self._deliver(on_message)
                    continue
                if self._hung_up:
                    break
                now = trio.current_time()
                if now >= self._close_by:
                    break  # the client did not answer our close in time
                core.handle_timer(now)  # a ping, a cut, a handshake deadline
                self._after_core()
        finally:
            self._read_scope = None
            self._done_reading()

    async def _read_fd(self, on_message: OnMessage) -> None:
        """The reader of a plain socket with shared timers: an idle connection waits in
        `wait_readable` alone (no cancel scope, no stream or socket wrapper, each of which a
        waiting connection would keep alive); `_timers` acts on its deadlines."""
        core = self.core
        fd = self._fd
        try:
            await self._take_leftover(on_message)
            while not core.input_ended and not self._hung_up:
                try:
                    data: bytes | None = os.read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data is None:  # wait outside the `except`: the exception would stay alive
                    self._schedule()
                    self._waiting = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        break  # hung up (`_hang_up`), or the stream was closed
                    finally:
                        self._waiting = False
                    continue
                await trio.lowlevel.cancel_shielded_checkpoint()  # others run between reads
                core.receive_data(data or None, trio.current_time())
                data = None  # not kept while waiting for more
                await self._deliver(on_message)
        finally:
            self._done_reading()

    async def _take_leftover(self, on_message: OnMessage) -> None:
        """What was read past the request head: the client's first frames, maybe."""
        if self.leftover:
            leftover, self.leftover = self.leftover, b""
            self.core.receive_data(leftover, trio.current_time())
            await self._deliver(on_message)

    async def _receive(self) -> bytes:
        """The next bytes from the client (b"": it left)."""
        fd = self._fd
        if fd < 0:
            return await self.stream.receive_some(RECEIVE_SIZE)
        while True:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                data = None
            if data is None:  # wait outside the `except`: the exception would stay alive
                await trio.lowlevel.wait_readable(fd)
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()  # others run between reads
            return data

    def _done_reading(self) -> None:
        if self._reader_done is not None:
            self._reader_done.set()
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


class Timers:
    """The deadlines of every connection of the port, kept by one task (`run`): a heap entry
    per connection instead of a cancel scope per connection. An entry names its connection
    weakly (a closed one is not kept alive) and may be stale (the connection's deadline moved
    on): the connection checks its own deadline when told (`WebSocketTransport.on_timer`)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[WebSocketTransport]]] = []
        self._order = itertools.count()
        self._next = math.inf
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, transport: WebSocketTransport) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), weakref.ref(transport)))
        if deadline < self._next:
            self._wakeup.set()

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                transport = heapq.heappop(heap)[2]()
                if transport is None:
                    continue
                try:
                    transport.on_timer(now)
                except Exception:  # one connection's failure is that connection's
                    log.exception("websocket %s: timer failed", transport.number)
                    transport.core.connection_lost()
                    transport._hang_up()
            self._next = heap[0][0] if heap else math.inf
            self._wakeup = trio.Event()
            with trio.move_on_at(self._next):
                await self._wakeup.wait()


def _unsent(frames: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What of `frames` is left once the socket took `sent` bytes of them (no copy)."""
    for i, frame in enumerate(frames):
        if sent < len(frame):
            return [memoryview(frame)[sent:] if sent else frame, *frames[i + 1 :]]
        sent -= len(frame)
    return []


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
