"""RFC 6455 frames once the handshake is done, without I/O: feed the other end's bytes
(`FrameReader.feed`), take messages and control events (`next_event`) until None. A server reads
a client's masked frames (`FrameReader`: the hub's), a client a server's unmasked ones
(`ClientFrameReader`: the LAN link's dialer).

Why not wsproto: the hub reads every message of every client, and in a join's awareness flood
wsproto's parsing was its largest CPU item (~50 us a message: an event generator, a bytearray
buffer, a masker object and an event per frame), while each of its idle connections kept a dozen
objects alive. This reader is one object with slots per connection; a frame that is in the bytes
at hand is sliced and unmasked at once, with one big-integer XOR when small (for a few hundred
bytes a few times faster than wsproto's four `translate` calls, which win from about 1 KiB on).

It enforces what wsproto enforces, with the same close codes (checked against wsproto by
tests/test_wsframes.py): unmasked client frames (masked server frames for a client), reserved bits (no extensions are
negotiated), unknown opcodes, fragmented or oversized control frames, non-minimal lengths, a
continuation without a start or a new message inside a fragmented one, and close codes that may
not be sent (1002); invalid UTF-8 in a text message or a close reason (1007). A message larger
than `max_message` is refused from its frame's header (1009), before its payload is buffered.
After a close frame or an error the reader is done and ignores what follows.

The frames sent are built here too, as wsproto built them: a message (`message_frame`), pong,
ping, close; masked when a client sends them (`masked=True`), with keys from `os.urandom` taken
a pool at a time (one system call per thousand frames rather than one per frame).
"""

from __future__ import annotations

import codecs
import os
import struct
from typing import NamedTuple

__all__ = [
    "Close",
    "FrameError",
    "ClientFrameReader",
    "FrameReader",
    "Ping",
    "Pong",
    "close_frame",
    "message_frame",
    "ping_frame",
    "pong_frame",
    "unmask",
]

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_LARGE = 1009
NO_STATUS = 1005
WIRE_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
"""The codes below 3000 a close frame may carry (wsproto's list: RFC 6455's, less those that
only name what happened locally, 1005, 1006 and 1015); 3000-4999 are free for applications."""
SMALL_MASK = 1024
"""Payloads shorter than this are unmasked with one integer XOR, longer ones with `translate`."""


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    """The client's close frame: `code` 1005 if it carried none."""

    code: int
    reason: str


Event = bytes | str | Ping | Pong | Close
"""A complete message (bytes: binary, str: text) or a control frame."""


class FrameError(Exception):
    """The client broke the protocol: close the connection with `code` (and `reason`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameReader:
    """The client-to-server frames of one connection. `feed(data)`, then `next_event()` until
    None; it raises `FrameError` once when the client broke the protocol."""

    __slots__ = (
        "max_message",
        "done",
        "_buf",
        "_pos",
        "_need",
        "_fin",
        "_mask",
        "_opcode",
        "_size",
        "_parts",
        "_decoder",
    )

    def __init__(self, max_message: int = 256 << 20) -> None:
        self.max_message = max_message
        self.done = False
        """A close frame was read, or the client broke the protocol: nothing more is read."""
        self._buf = b""  # unread bytes from `_pos` on (b"" while idle: no read is kept alive)
        self._pos = 0
        self._need = 0  # inside a data frame: payload bytes still to come
        self._fin = False  # that frame ends its message
        self._mask = b""  # that frame's key, turned to where its next payload byte is
        self._opcode = 0  # the message being read (TEXT or BINARY), 0 between messages
        self._size = 0  # its bytes so far
        self._parts: list[bytes] | list[str] | None = None  # its earlier pieces
        self._decoder: codecs.IncrementalDecoder | None = None  # a text message in pieces

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the client (ignored once `done`)."""
        if self.done or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # (what is sliced from it must be bytes)
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data  # a partial header, or unread events
        else:
            self._buf = data
        self._pos = 0

    def next_event(self) -> Event | None:
        """The next message or control frame of what was fed; None until more is fed."""
        while not self.done:
            buf, pos = self._buf, self._pos
            end = len(buf)
            if self._need:  # the rest of a data frame, as it comes
                if pos == end:
                    return self._idle(buf, pos)
                take = min(self._need, end - pos)
                chunk = buf if pos == 0 and take == end else buf[pos : pos + take]
                self._pos = pos + take
                self._need -= take
                mask = self._mask
                if take & 3:
                    self._mask = mask[take & 3 :] + mask[: take & 3]
                message = self._piece(unmask(chunk, mask), self._fin and not self._need)
                if message is not None:
                    return message
                continue
            if end - pos < 2:
                return self._idle(buf, pos)
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if opcode > BINARY and opcode not in (CLOSE, PING, PONG):
                raise self._fail(PROTOCOL_ERROR, f"invalid opcode {opcode:#x}")
            n = b1 & 0x7F
            if opcode & 0x08:
                if not b0 & 0x80:
                    raise self._fail(PROTOCOL_ERROR, "fragmented control frame")
                if n > 125:
                    raise self._fail(PROTOCOL_ERROR, "control frame with payload len > 125")
            head = pos + 2
            if n == 126:
                if end - head < 2:
                    return self._idle(buf, pos)
                (n,) = struct.unpack_from("!H", buf, head)
                head += 2
                if n < 126:
                    raise self._fail(PROTOCOL_ERROR, "payload length not minimal")
            elif n == 127:
                if end - head < 8:
                    return self._idle(buf, pos)
                (n,) = struct.unpack_from("!Q", buf, head)
                head += 8
                if n < 65536:
                    raise self._fail(PROTOCOL_ERROR, "payload length not minimal")
                if n >> 63:
                    raise self._fail(PROTOCOL_ERROR, "8-byte payload length with non-zero MSB")
            if b0 & 0x70:
                raise self._fail(PROTOCOL_ERROR, "reserved bit set")
            if not b1 & 0x80:
                raise self._fail(PROTOCOL_ERROR, "unmasked frame from a client")
            if end - head < 4:
                return self._idle(buf, pos)
            mask = buf[head : head + 4]
            start = head + 4
            if opcode & 0x08:  # a control frame: waited for whole (at most 125 bytes)
                if end - start < n:
                    return self._idle(buf, pos)
                self._pos = start + n
                payload = unmask(buf[start : start + n], mask)
                if opcode == PING:
                    return Ping(payload)
                if opcode == PONG:
                    return Pong(payload)
                self._finish()  # whatever follows a close is not read
                return _close(payload)
            if opcode == CONTINUATION:
                if not self._opcode:
                    raise self._fail(PROTOCOL_ERROR, "continuation frame without a message")
            elif self._opcode:
                raise self._fail(PROTOCOL_ERROR, "new message inside a fragmented one")
            else:
                self._opcode = opcode
            self._size += n
            if self._size > self.max_message:
                raise self._fail(TOO_LARGE, "too-large")
            fin = bool(b0 & 0x80)
            if end - start >= n:  # the whole frame is at hand
                self._pos = start + n
                if fin and opcode == BINARY:  # a whole binary message: y-websocket's
                    self._opcode = self._size = 0
                    return unmask(buf[start : start + n], mask)
                message = self._piece(unmask(buf[start : start + n], mask), fin)
                if message is not None:
                    return message
                continue
            self._pos = start
            self._need = n
            self._fin = fin
            self._mask = mask
        return None

    def _idle(self, buf: bytes, pos: int) -> None:
        """Out of bytes: keep only what is unread (a partial header), not the whole read."""
        self._buf = buf[pos:] if pos else buf
        self._pos = 0
        return None

    def _piece(self, data: bytes, last: bool) -> bytes | str | None:
        """Add `data` to the message being read; the message if `last` completes it."""
        parts = self._parts
        if self._opcode == TEXT:
            if parts is None and last:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise self._fail(INVALID_DATA, "invalid UTF-8 in a text message") from None
                self._opcode = self._size = 0
                return text
            if self._decoder is None:
                self._decoder = _utf8_decoder()
            try:  # piece by piece, as wsproto does: bad bytes end it before the rest arrives
                piece: bytes | str = self._decoder.decode(data, last)
            except UnicodeDecodeError:
                raise self._fail(INVALID_DATA, "invalid UTF-8 in a text message") from None
        else:
            piece = data
        if not last:
            if parts is None:
                self._parts = [piece]  # type: ignore[assignment]
            else:
                parts.append(piece)  # type: ignore[arg-type]
            return None
        self._opcode = self._size = 0
        self._decoder = None
        if parts is None:
            return piece
        self._parts = None
        parts.append(piece)  # type: ignore[arg-type]
        return "".join(parts) if isinstance(piece, str) else b"".join(parts)  # type: ignore[arg-type]

    def _fail(self, code: int, reason: str) -> FrameError:
        self._finish()
        return FrameError(code, reason)

    def _finish(self) -> None:
        self.done = True
        self._buf = b""
        self._pos = self._need = self._opcode = self._size = 0
        self._parts = self._decoder = None


class ClientFrameReader(FrameReader):
    """The server-to-client frames of one connection (the LAN link's dialer): the same rules,
    but frames come unmasked (a masked one is a protocol error, 1002, as wsproto has it). Its
    own loop, not a flag in the server's: the hub reads every message of every client."""

    __slots__ = ()

    def next_event(self) -> Event | None:
        """The next message or control frame of what was fed; None until more is fed."""
        while not self.done:
            buf, pos = self._buf, self._pos
            end = len(buf)
            if self._need:  # the rest of a data frame, as it comes
                if pos == end:
                    return self._idle(buf, pos)
                take = min(self._need, end - pos)
                chunk = buf if pos == 0 and take == end else buf[pos : pos + take]
                self._pos = pos + take
                self._need -= take
                message = self._piece(chunk, self._fin and not self._need)
                if message is not None:
                    return message
                continue
            if end - pos < 2:
                return self._idle(buf, pos)
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if opcode > BINARY and opcode not in (CLOSE, PING, PONG):
                raise self._fail(PROTOCOL_ERROR, f"invalid opcode {opcode:#x}")
            n = b1 & 0x7F
            if opcode & 0x08:
                if not b0 & 0x80:
                    raise self._fail(PROTOCOL_ERROR, "fragmented control frame")
                if n > 125:
                    raise self._fail(PROTOCOL_ERROR, "control frame with payload len > 125")
            head = pos + 2
            if n == 126:
                if end - head < 2:
                    return self._idle(buf, pos)
                (n,) = struct.unpack_from("!H", buf, head)
                head += 2
                if n < 126:
                    raise self._fail(PROTOCOL_ERROR, "payload length not minimal")
            elif n == 127:
                if end - head < 8:
                    return self._idle(buf, pos)
                (n,) = struct.unpack_from("!Q", buf, head)
                head += 8
                if n < 65536:
                    raise self._fail(PROTOCOL_ERROR, "payload length not minimal")
                if n >> 63:
                    raise self._fail(PROTOCOL_ERROR, "8-byte payload length with non-zero MSB")
            if b0 & 0x70:
                raise self._fail(PROTOCOL_ERROR, "reserved bit set")
            if b1 & 0x80:
                raise self._fail(PROTOCOL_ERROR, "masked frame from a server")
            start = head
            if opcode & 0x08:  # a control frame: waited for whole (at most 125 bytes)
                if end - start < n:
                    return self._idle(buf, pos)
                self._pos = start + n
                payload = buf[start : start + n]
                if opcode == PING:
                    return Ping(payload)
                if opcode == PONG:
                    return Pong(payload)
                self._finish()  # whatever follows a close is not read
                return _close(payload)
            if opcode == CONTINUATION:
                if not self._opcode:
                    raise self._fail(PROTOCOL_ERROR, "continuation frame without a message")
            elif self._opcode:
                raise self._fail(PROTOCOL_ERROR, "new message inside a fragmented one")
            else:
                self._opcode = opcode
            self._size += n
            if self._size > self.max_message:
                raise self._fail(TOO_LARGE, "too-large")
            fin = bool(b0 & 0x80)
            if end - start >= n:  # the whole frame is at hand
                self._pos = start + n
                payload = buf[start : start + n]
                if fin and opcode == BINARY:  # a whole binary message: y-websocket's
                    self._opcode = self._size = 0
                    return payload
                message = self._piece(payload, fin)
                if message is not None:
                    return message
                continue
            self._pos = start
            self._need = n
            self._fin = fin
        return None


def _close(payload: bytes) -> Close:
    """A client's close frame's code and reason (wsproto's rules)."""
    if not payload:
        return Close(NO_STATUS, "")
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in WIRE_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(PROTOCOL_ERROR, f"close code {code} is not allowed on the wire")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "invalid UTF-8 in a close reason") from None
    return Close(code, reason)


_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_XOR_TABLES: list[bytes] = []


def unmask(data: bytes, mask: bytes) -> bytes:
    """`data` XOR the 4-byte `mask`, repeated."""
    n = len(data)
    if n < SMALL_MASK:
        if not n:
            return data
        key = mask * ((n + 3) >> 2)
        x = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
        return x.to_bytes(len(key), "little")[:n] if n & 3 else x.to_bytes(n, "little")
    if not _XOR_TABLES:
        _XOR_TABLES.extend(bytes(a ^ b for a in range(256)) for b in range(256))
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[mask[i]])
    return bytes(out)


# ------------------------------------------------------------------------- what is sent
_KEYS = b""
_key_at = 0
KEY_POOL = 4096
"""Bytes of `os.urandom` drawn at once for the masking keys of a client's frames."""


def mask_key() -> bytes:
    """A fresh unpredictable 4-byte masking key (RFC 6455 5.3), from a pool of random bytes."""
    global _KEYS, _key_at
    at = _key_at
    if at >= len(_KEYS):
        _KEYS, at = os.urandom(KEY_POOL), 0
    _key_at = at + 4
    return _KEYS[at : at + 4]


def _frame(b0: int, payload: bytes, masked: bool) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, n)
    if not masked:
        return head + payload
    key = mask_key()
    return head + key + unmask(payload, key)


def message_frame(message: bytes | str, masked: bool = False) -> bytes:
    """One whole message (str: text, else binary) in one frame."""
    if type(message) is str:
        return _frame(0x80 | TEXT, message.encode("utf-8"), masked)
    return _frame(0x80 | BINARY, bytes(message), masked)  # type: ignore[arg-type]


def _control(opcode: int, payload: bytes, masked: bool = False) -> bytes:
    if masked:
        return _frame(0x80 | opcode, payload, True)
    return bytes((0x80 | opcode, len(payload))) + payload


def ping_frame(payload: bytes = b"", masked: bool = False) -> bytes:
    return _control(PING, payload, masked)


def pong_frame(payload: bytes, masked: bool = False) -> bytes:
    """The answer to a ping: the same payload back."""
    return _control(PONG, payload, masked)


def close_frame(code: int | None, reason: str = "", masked: bool = False) -> bytes:
    """A close frame with `code` and `reason` (cut to fit 125 bytes, on a character boundary).
    A code that may not be sent (1005: the client's close had none; 1006, 1015) goes out as
    1000, as wsproto sends it; None: a close frame without a code (wsproto's answer to one)."""
    if code is None:
        return _control(CLOSE, b"", masked)
    if code in (NO_STATUS, 1006, 1015):
        code = 1000
    data = reason.encode("utf-8")
    if len(data) > 123:
        data = data[:123].decode("utf-8", "ignore").encode("utf-8")
    return _control(CLOSE, code.to_bytes(2, "big") + data, masked)
