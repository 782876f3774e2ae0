"""One websocket connection without I/O, either end (RFC 6455): the opening handshake
(`ClientHandshake`, `ServerHandshake`, over wsproto) and the open connection (`WebSocketCore`,
over `wsframes`).

Each takes the bytes read and returns the bytes to write, so the size limit, the answers to
pings, the closing handshake and a peer that breaks the framing are tested by feeding bytes.
The trio shell (`wsstream.py`) only moves them: it reads in the task that asks for a message
and writes from the task that sends one, which is why it exists (trio-websocket reads in a task
of its own and sends under a lock: a task switch more each way on every message of a LAN hop).

Close codes and reasons are trio-websocket's, which the peers spoke before: a message over the
limit is closed with 1009 "Exceeded maximum message size: N bytes", a connection that ended
without a close frame reads as 1006.

Why the frames are not wsproto's: on a LAN hop wsproto's parsing cost ~15 us a message at each
end (an event generator, a buffer, a masker object per frame) and its framing about as much;
`wsframes` reads and builds them in a few microseconds, with the same rules and close codes.
Only the handshake, once per connection, stays with wsproto; the bytes read with its end are
handed to the frame reader.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .wsframes import (
    NO_STATUS,
    TOO_LARGE,
    ClientFrameReader,
    Close,
    FrameError,
    FrameReader,
    Ping,
    close_frame,
    message_frame,
    ping_frame,
    pong_frame,
)

__all__ = [
    "ABNORMAL",
    "MESSAGE_TOO_BIG",
    "NORMAL",
    "ClientHandshake",
    "CloseReason",
    "ConnectionClosed",
    "HandshakeFailed",
    "Rejected",
    "ServerHandshake",
    "UpgradeRequest",
    "WebSocketCore",
]

NORMAL = 1000
PROTOCOL_ERROR = 1002
ABNORMAL = 1006
"""The connection ended without a close frame (never sent on the wire)."""
MESSAGE_TOO_BIG = 1009
MAX_HEAD = 16 * 1024
"""The largest HTTP head read in an opening handshake."""
_HEAD_END = re.compile(b"\n\r?\n")
"""Where an HTTP head ends (h11's rule): what follows is the first frames."""


def _after_head(seen: bytes | bytearray) -> bytes:
    """The bytes read after the HTTP head in `seen` (frames sent right behind it)."""
    end = _HEAD_END.search(seen)
    return bytes(seen[end.end() :]) if end else b""


@dataclass(frozen=True, slots=True)
class CloseReason:
    """Why a websocket closed: the close frame's code and reason (`reason` None if it had
    none), as trio-websocket's `CloseReason` names them."""

    code: int
    reason: str | None = None


class ConnectionClosed(Exception):
    """The websocket is closed (`reason`): raised by reads once every message before the close
    was taken, and by sends."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason)
        self.reason = reason


class HandshakeFailed(Exception):
    """The opening handshake did not complete: not HTTP, not a websocket upgrade, or the other
    end left."""


class Rejected(HandshakeFailed):
    """The server answered the upgrade with another HTTP status (503 `busy`, 404...)."""

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"the server refused the websocket upgrade with HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


# ------------------------------------------------------------------------ the opening handshake
class ClientHandshake:
    """The dialer's upgrade request and the reading of the answer."""

    def __init__(
        self, host: str, path: str, *, max_message: int, extra_headers: Iterable = ()
    ) -> None:
        self.proto = WSConnection(ConnectionType.CLIENT)
        self.max_message = max_message
        self._request = self.proto.send(
            Request(host=host, target=path, extra_headers=list(extra_headers))
        )
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._seen = bytearray()

    def request(self) -> bytes:
        """The upgrade request to write first."""
        return self._request

    def receive_data(self, data: bytes | None) -> WebSocketCore | None:
        """Bytes of the answer (None: the server left). -> the open connection once accepted
        (holding any frames read with the answer), None until the answer is complete;
        `Rejected` for another status, `HandshakeFailed` for anything else."""
        if data and len(self._seen) <= MAX_HEAD:
            self._seen += data
        try:
            self.proto.receive_data(data)
            events = list(self.proto.events())
        except (RemoteProtocolError, LocalProtocolError) as exc:
            raise HandshakeFailed(f"bad upgrade answer: {exc}") from None
        for event in events:
            if isinstance(event, AcceptConnection):
                return WebSocketCore(
                    client=True, max_message=self.max_message, pending=_after_head(self._seen)
                )
            if isinstance(event, RejectConnection):
                self._status, self._headers = event.status_code, list(event.headers)
                if not event.has_body:
                    raise Rejected(self._status, self._headers, b"")
            elif isinstance(event, RejectData):
                self._body += event.data
                if event.body_finished:
                    raise Rejected(self._status, self._headers, bytes(self._body))
        if data is None:
            if self._status:
                raise Rejected(self._status, self._headers, bytes(self._body))
            raise HandshakeFailed("the server closed the connection during the upgrade")
        if len(self._body) > MAX_HEAD:
            raise Rejected(self._status, self._headers, bytes(self._body[:MAX_HEAD]))
        return None


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A client's upgrade request, as wsproto parsed it."""

    path: str
    headers: dict[str, str] = field(default_factory=dict)
    """Lower-case names; repeated headers joined with ", "."""


class ServerHandshake:
    """The listener's reading of an upgrade request, and its answer (accept or refuse)."""

    def __init__(self) -> None:
        self.proto = WSConnection(ConnectionType.SERVER)
        self.request: UpgradeRequest | None = None
        self._size = 0
        self._seen = bytearray()

    def receive_data(self, data: bytes | None) -> UpgradeRequest | None:
        """Bytes of the request (None: the client left). -> the request once its head is
        complete; `HandshakeFailed` if it is no websocket upgrade, too large, or cut short."""
        self._size += len(data or b"")
        if data and len(self._seen) <= MAX_HEAD:
            self._seen += data
        try:
            self.proto.receive_data(data)
            for event in self.proto.events():
                if isinstance(event, Request):
                    headers: dict[str, str] = {}
                    for name, value in event.extra_headers:
                        key = bytes(name).decode("latin-1").lower()
                        text = bytes(value).decode("latin-1")
                        headers[key] = f"{headers[key]}, {text}" if key in headers else text
                    self.request = UpgradeRequest(event.target, headers)
                    return self.request
        except RemoteProtocolError as exc:
            raise HandshakeFailed(f"bad upgrade request: {exc}") from None
        if data is None:
            raise HandshakeFailed("the client left during the upgrade")
        if self._size > MAX_HEAD:
            raise HandshakeFailed("upgrade request too large")
        return None

    def accept(self, *, max_message: int) -> tuple[bytes, WebSocketCore]:
        """The `101` to write, and the open connection (holding any frames already read)."""
        data = self.proto.send(AcceptConnection())
        pending = _after_head(self._seen)
        self._seen = bytearray()
        return data, WebSocketCore(client=False, max_message=max_message, pending=pending)

    def reject(self, status: int, body: bytes = b"") -> bytes:
        """An HTTP answer in place of the upgrade (to write, then hang up)."""
        headers = [(b"Content-Length", str(len(body)).encode("ascii"))] if body else []
        data = self.proto.send(
            RejectConnection(status_code=status, headers=headers, has_body=bool(body))
        )
        if body:
            data += self.proto.send(RejectData(data=body))
        return data


# ----------------------------------------------------------------------- the open connection
class WebSocketCore:
    """An open websocket, driven by the bytes read; what to write comes out of `data_to_send`.
    `client`: the dialer's end (it masks what it sends, and reads unmasked frames).

    Reading: `receive_data(data)` (None: the connection ended), then `next_message()` until
    None. Pings are answered and a close frame answered in order, as they come. Writing:
    `send_message` and `close` queue frames; the shell writes `data_to_send()` and gives back
    what the socket did not take (`put_back`)."""

    def __init__(self, *, client: bool, max_message: int, pending: bytes = b"") -> None:
        self.client = client
        self.max_message = max_message
        self.closed: CloseReason | None = None
        """Set once either side closed (our own close first, the answer's once it came), or
        the connection was lost: nothing can be sent any more."""
        self.input_ended = False
        """Nothing more will be read: the close frame came, the limit was hit, or the
        connection ended."""
        self.lost = False
        """The connection ended without the closing handshake: nothing more goes out."""
        self._reader = (ClientFrameReader if client else FrameReader)(max_message)
        self._reader.feed(pending)  # frames read with the handshake's end
        self._sent_close = False
        self._got_close = False
        self._out: deque[bytes | memoryview] = deque()
        self.pending = 0
        """Bytes queued, not yet taken by the socket."""

    # -- input -----------------------------------------------------------------------------------
    def receive_data(self, data: bytes | None) -> None:
        """Bytes read (None or b"": the connection ended)."""
        if self.input_ended:
            return
        if not data:
            self.input_ended = True
            self.lost = True
            self._drop_output()
            if self.closed is None:
                self.closed = CloseReason(ABNORMAL)
            return
        self._reader.feed(data)

    def next_message(self) -> bytes | str | None:
        """The next complete message read, or None until more arrives (or once the input
        ended: see `closed`)."""
        if self.input_ended:
            return None
        reader = self._reader
        try:
            while (event := reader.next_event()) is not None:
                kind = type(event)
                if kind is bytes or kind is str:
                    return event  # type: ignore[return-value]
                if kind is Ping:
                    if not self._sent_close:  # (none once our close went out)
                        self._queue(pong_frame(event.payload, self.client))  # type: ignore[union-attr]
                elif kind is Close:
                    self._close_received(event)  # type: ignore[arg-type]
                    return None
        except FrameError as exc:
            if exc.code == TOO_LARGE:
                self._fail(
                    MESSAGE_TOO_BIG, f"Exceeded maximum message size: {self.max_message} bytes"
                )
            else:
                self._fail(exc.code, exc.reason)
        return None

    def _close_received(self, event: Close) -> None:
        self.input_ended = True
        self._got_close = True
        self.closed = CloseReason(event.code, event.reason or None)
        if not self._sent_close:  # the answer to the peer's close: its code and reason back
            self._sent_close = True
            code = None if event.code == NO_STATUS else event.code
            self._queue(close_frame(code, event.reason, self.client))

    def _fail(self, code: int, reason: str) -> None:
        """We end the connection for what the peer sent (too large, bad framing): our close
        frame goes out, nothing more is read."""
        self.input_ended = True
        self.closed = CloseReason(code, reason)
        if not self._sent_close:
            self._sent_close = True
            self._queue(close_frame(code, reason, self.client))

    def connection_lost(self) -> None:
        """Writing failed: the connection is gone, nothing more goes out or comes in."""
        self.receive_data(None)
        self._drop_output()

    # -- output ----------------------------------------------------------------------------------
    def send_message(self, message: bytes | str) -> None:
        """Queue one message; `ConnectionClosed` once either side closed."""
        if self.closed is not None or self._sent_close:
            raise ConnectionClosed(self.closed or CloseReason(ABNORMAL))
        self._queue(message_frame(message, self.client))

    def ping(self, payload: bytes = b"") -> None:
        """Queue a ping (nothing once either side closed)."""
        if self.closed is None and not self._sent_close:
            self._queue(ping_frame(payload, self.client))

    def close(self, code: int = NORMAL, reason: str | None = None) -> None:
        """Start the closing handshake (nothing if it is under way or over)."""
        if self.closed is not None or self._sent_close:
            return
        self.closed = CloseReason(code, reason)
        self._sent_close = True
        self._queue(close_frame(code, reason or "", self.client))

    def _queue(self, data: bytes) -> None:
        if self.lost:
            return
        self._out.append(data)
        self.pending += len(data)

    def data_to_send(self) -> bytes | memoryview:
        """Everything queued, in one buffer (b"": nothing)."""
        out = self._out
        if not out:
            return b""
        data = out.popleft() if len(out) == 1 else b"".join(out)
        out.clear()
        self.pending = 0
        return data

    def put_back(self, rest: bytes | memoryview) -> None:
        """The tail of `data_to_send()` the socket did not take: it goes out first."""
        if rest and not self.lost:
            self._out.appendleft(rest)
            self.pending += len(rest)

    def _drop_output(self) -> None:
        self._out.clear()
        self.pending = 0

    @property
    def finished(self) -> bool:
        """The closing handshake is over (or the connection lost): the shell may hang up once
        what is queued is written."""
        return self.lost or (self._sent_close and self._got_close)
