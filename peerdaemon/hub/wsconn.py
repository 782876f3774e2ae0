"""One websocket connection of the hub, without I/O: what the client's bytes mean, what to write
next, and when to give up on the client.

The transport (`transport.py`) feeds it the bytes it reads and the time (`receive_data(data,
now)`, then `next_message()` until None), writes what `data_to_send()` returns, sleeps until
`get_timer()` and then calls `handle_timer(now)`. Everything that decides is here, so keep-alive,
the handshake deadline and the too-slow rule are tested with a made-up clock and no socket:

* Keep-alive: a client silent for `ping_interval` is pinged; one silent for twice that (no
  pong either: a laptop that went to sleep) is cut, which frees its device slot and awareness.
* Handshake deadline (`watch`, from `admission.py`): a connection still not authenticated by
  then is cut.
* Too slow: a writer that made no progress for `stall_seconds` drops the client (1013
  `too-slow`), as does an outbox past `limit_bytes` (`Outlet.send`).

Outgoing frames live in the connection's `Outlet` (ywebsocket.py): the rooms put the same frame
bytes in every recipient's outbox (built once per broadcast by `ws_frame`; a large one stays in
pieces, its header and the payload as it came, so a 15 MB first sync is never copied into a
frame). What the client sends is read by `core.wsframes.FrameReader`, which also builds the
control frames sent back (pong, ping, close).
"""

from __future__ import annotations

import logging
import math
import struct
from typing import Protocol

from ..core.wsframes import (
    Close,
    FrameError,
    FrameReader,
    Ping,
    close_frame,
    ping_frame,
    pong_frame,
)
from .ywebsocket import CLOSE_CODES, Frame, Outlet

__all__ = ["HandshakeDeadline", "WsConn", "ws_frame"]

log = logging.getLogger("peerdaemon.hub.ws")

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
SPLIT_FRAME = 1 << 16
"""A frame at least this large stays in pieces (header, payload): copying it costs more than
the extra buffer in a `writev`."""


def ws_frame(*parts: bytes, opcode: int = OPCODE_BINARY) -> Frame:
    """An unmasked, final server frame (binary by default) holding `parts`: built once,
    written to many. A large one is `(header, *parts)`, not copied (`ywebsocket.Frame`)."""
    n = sum(len(p) for p in parts)
    b0 = 0x80 | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 126, n)
    else:
        head = struct.pack("!BBQ", b0, 127, n)
    if n >= SPLIT_FRAME:
        return (head, *parts)
    return b"".join((head, *parts))


class HandshakeDeadline(Protocol):
    """A rule that cuts a connection not authenticated in time (`admission.HandshakeWatch`)."""

    def get_timer(self) -> float: ...
    def expired(self, now: float) -> bool: ...


class WsConn:
    """The server side of one upgraded connection, driven by the bytes read and `now`."""

    __slots__ = (
        "outlet",
        "reader",
        "ping_interval",
        "stall_seconds",
        "watch",
        "last_received",
        "lost",
        "cut",
        "input_ended",
        "_pinged",
        "_close_sent",
        "_write_since",
    )

    def __init__(
        self,
        outlet: Outlet,
        *,
        now: float,
        max_message: int = 256 << 20,
        ping_interval: float = 30.0,
        stall_seconds: float = 30.0,
        watch: HandshakeDeadline | None = None,
    ) -> None:
        self.outlet = outlet
        self.reader = FrameReader(max_message)
        self.ping_interval = ping_interval
        self.stall_seconds = stall_seconds
        self.watch = watch
        self.last_received = now
        self.lost = False
        """No close frame can be sent: the transport is gone, or the client is being cut."""
        self.cut = False
        """Hang up at once, without the closing handshake (timed out, or not authenticated)."""
        self.input_ended = False
        """Nothing more will be read: the client closed, broke the protocol, or left."""
        self._pinged = False
        self._close_sent = False
        self._write_since: float | None = None

    # -- input -----------------------------------------------------------------------------------
    def receive_data(self, data: bytes | None, now: float) -> None:
        """Bytes read from the client (None: the connection ended); then `next_message()`."""
        self.last_received = now
        self._pinged = False
        if data is None:
            self.input_ended = True
            self._lose("connection lost")
            return
        self.reader.feed(data)

    def next_message(self) -> bytes | str | None:
        """The next complete message of what was received, or None until more arrives. Pings
        are answered and a close is taken note of here, in the order the client sent them."""
        if self.input_ended:
            return None
        reader = self.reader
        while True:
            try:
                event = reader.next_event()
            except FrameError as exc:
                self._protocol_error(exc)
                return None
            if event is None or type(event) is bytes or type(event) is str:
                return event  # type: ignore[return-value]
            if type(event) is Ping:
                self.outlet.send(pong_frame(event.payload))  # (not once closing)
            elif type(event) is Close:
                self.input_ended = True
                self.outlet.close(event.code, event.reason)
                return None
            # a pong: the client is alive, which `receive_data` noted

    def _protocol_error(self, exc: FrameError) -> None:
        log.info("websocket %s: protocol error: %s (%d)", self.outlet.number, exc, exc.code)
        self.input_ended = True
        self.outlet.close(exc.code, exc.reason)

    def _lose(self, reason: str) -> None:
        self.lost = True
        self.outlet.close(1006, reason)

    def connection_lost(self) -> None:
        """The transport failed while writing: no close frame, nothing more to send."""
        self._lose("connection lost")

    # -- output ----------------------------------------------------------------------------------
    def data_to_send(self) -> list[bytes | memoryview]:
        """The writer's next batch: the queued frames, then (once, when closing and drained) the
        close frame."""
        frames = self.outlet.outbox.take()
        if frames or self.lost or self._close_sent or self.outlet.closing is None:
            return frames
        self._close_sent = True
        return [close_frame(*self.outlet.closing)]

    def put_back(self, rest: bytes | memoryview | list[bytes | memoryview]) -> None:
        """The unsent rest of a batch: it goes out first."""
        self.outlet.outbox.put_back(rest)

    @property
    def finished(self) -> bool:
        """Nothing more will be written: closed (the close frame handed out) or lost."""
        return self.lost or (self._close_sent and not self.outlet.outbox.nbytes)

    def write_waiting(self, now: float) -> None:
        """The writer hands the socket a chunk at `now`; it must take it within
        `stall_seconds`."""
        self._write_since = now

    def write_done(self) -> None:
        """The socket took what the writer had."""
        self._write_since = None

    @property
    def write_deadline(self) -> float:
        """When the chunk being written counts as stalled (inf while not writing)."""
        if self._write_since is None:
            return math.inf
        return self._write_since + self.stall_seconds

    # -- time ------------------------------------------------------------------------------------
    def get_timer(self) -> float:
        """When `handle_timer` has something to do next (inf: nothing)."""
        if self.lost:
            return math.inf
        deadline = self.write_deadline
        if self.outlet.closing is None:
            silence = (2 if self._pinged else 1) * self.ping_interval  # cut, or ping
            deadline = min(deadline, self.last_received + silence)
            if self.watch is not None:
                deadline = min(deadline, self.watch.get_timer())
        return deadline

    def handle_timer(self, now: float) -> None:
        """Apply the rules whose time has come: cut a client not authenticated in time or
        silent too long, ping a quiet one, drop a stalled one."""
        if self.lost:
            return
        if now >= self.write_deadline:
            log.info("websocket client %s stalled; dropped", self.outlet.number)
            self.outlet.dropped_slow = True
            self.outlet.close(CLOSE_CODES["too-slow"], "too-slow")
            self.lost = True
            return
        if self.outlet.closing is not None:
            return
        if self.watch is not None and self.watch.expired(now):
            self._cut("not authenticated in time")
            return
        idle = now - self.last_received
        if idle >= 2 * self.ping_interval:
            self._cut("timeout")
        elif idle >= self.ping_interval and not self._pinged:
            self._pinged = True
            self.outlet.send(ping_frame())

    def _cut(self, reason: str) -> None:
        log.info("websocket client %s: %s; dropped", self.outlet.number, reason)
        self.cut = True
        self._lose(reason)
