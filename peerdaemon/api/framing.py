"""Sans-I/O framing for the local API: 4-byte big-endian length + one CBOR map per frame.

No sockets here, so the trio server, the trio client and the blocking client share one decoder
and the edge cases (split reads, oversized and malformed frames) are tested without I/O.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import cbor2

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "MAX_FRAME_LIMIT",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "decode_payload",
    "encode_frame",
    "encode_payload",
]

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
"""Default largest accepted payload (bytes, excluding the 4-byte header)."""

HEADER_SIZE = 4
MAX_FRAME_LIMIT = 0xFFFF_FFFF
"""The header is a u32, so no payload can be larger than this."""

_HEADER = struct.Struct(">I")

# Frame-level error codes (duplicated as plain strings so this module has no dependencies).
_BAD_FRAME = "bad-frame"
_FRAME_TOO_LARGE = "frame-too-large"


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame that could not be decoded; returned (not raised) so the caller can answer and go on.

    The decoder has already consumed (or will stream away) the offending payload, so the next
    call to `FrameDecoder.next_event` continues with the following frame.
    """

    code: str
    message: str


class FrameTooLarge(ValueError):
    """Raised by `encode_frame` when the encoded payload exceeds the given limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def encode_payload(obj: Any) -> bytes:
    """CBOR-encode one message (no header). Raises `cbor2.CBOREncodeError` for unencodable values."""
    return cbor2.dumps(obj)


def encode_frame(obj: Any, *, max_frame: int = MAX_FRAME_LIMIT) -> bytes:
    """Encode one message as a complete frame (header + CBOR payload).

    Raises `FrameTooLarge` if the payload exceeds `max_frame`, so a sender can fail locally
    instead of sending something the peer will only skip.
    """
    payload = cbor2.dumps(obj)
    if len(payload) > min(max_frame, MAX_FRAME_LIMIT):
        raise FrameTooLarge(len(payload), min(max_frame, MAX_FRAME_LIMIT))
    return _HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[Any, Any] | FrameError:
    """Decode one payload that must hold exactly one CBOR map (nothing before or after it)."""
    if not payload:
        return FrameError(_BAD_FRAME, "empty frame")
    fp = io.BytesIO(payload)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, but semantic decoders may raise others
        return FrameError(_BAD_FRAME, f"malformed CBOR: {exc}")
    if fp.tell() != len(payload):
        return FrameError(
            _BAD_FRAME, f"{len(payload) - fp.tell()} trailing bytes after the CBOR item"
        )
    if not isinstance(obj, dict):
        return FrameError(_BAD_FRAME, f"frame is a CBOR {type(obj).__name__}, expected a map")
    return obj


class FrameDecoder:
    """Incremental frame decoder: `feed()` bytes as they arrive, then drain `next_event()`.

    Payloads larger than `max_frame` are reported once as `FrameError("frame-too-large")` as soon
    as their header is seen, then discarded as they stream in, never buffered.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not 0 < max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be in 1..{MAX_FRAME_LIMIT}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized payload still to discard

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (useful to detect EOF in the middle of a frame)."""
        return len(self._buf)

    @property
    def skipping(self) -> int:
        """Bytes of an oversized payload still to be discarded."""
        return self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes. Bytes of an oversized payload are dropped here without copying."""
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
            if not data:
                return
        self._buf += data

    def next_event(self) -> dict[Any, Any] | FrameError | None:
        """Return the next decoded map, a `FrameError`, or None if more bytes are needed."""
        buf = self._buf
        if self._skip or len(buf) < HEADER_SIZE:
            return None
        (length,) = _HEADER.unpack_from(buf)
        if length > self.max_frame:
            # Drop the header and whatever part of the payload is already here; feed() streams
            # the rest away.
            available = len(buf) - HEADER_SIZE
            dropped = min(available, length)
            del buf[: HEADER_SIZE + dropped]
            self._skip = length - dropped
            return FrameError(
                _FRAME_TOO_LARGE,
                f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes",
            )
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            payload = bytes(view[HEADER_SIZE:end])
        del buf[:end]
        return decode_payload(payload)

    def events(self) -> list[dict[Any, Any] | FrameError]:
        """Drain every complete event currently buffered."""
        out: list[dict[Any, Any] | FrameError] = []
        while (event := self.next_event()) is not None:
            out.append(event)
        return out
