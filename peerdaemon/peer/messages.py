"""The peer protocol's messages (docs/peer-protocol.md): one CBOR map per websocket message.

Pure functions and data only: decoding and validating here means the handshake, the session and
the hub share one definition of what a well-formed message is, and a malformed one is always the
same `PeerProtocolError` (closing the connection with a reason) rather than an exception from deep
inside.

Two exceptions close a connection, named for whose fault it is (as h11's `RemoteProtocolError` and
`LocalProtocolError`): `PeerProtocolError` for what the remote peer sent or is (a malformed or
out-of-order message, a failed auth, other versions, a peer that does not read), and
`LocalProtocolError` for what our own side cannot do (a message of ours over the size limit, a
box counter used up, our last common space left). Both are a `CloseConnection`, which the core
turns into the close message.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from ..model.lib0 import BadVarUint, read_var_uint, write_var_uint

__all__ = [
    "MAX_DOC_ID",
    "MAX_NAME",
    "MAX_TAGS",
    "PROTOCOL_VERSION",
    "REASONS",
    "SYNC_STEP1",
    "SYNC_STEP2",
    "SYNC_UPDATE",
    "CloseConnection",
    "LocalProtocolError",
    "PeerProtocolError",
    "decode",
    "decode_sync",
    "encode",
    "encode_sync",
    "validate_cleartext",
    "validate_inner",
]

PROTOCOL_VERSION = 1
"""Bumped on any change a version-1 peer could not understand; both sides must be equal."""

MAX_DOC_ID = 512
MAX_NAME = 256
MAX_DEVICE_ID = 128
MAX_REASON = 64
MAX_DETAIL = 1024
MAX_TAGS = 1024
"""At most this many space tags per message: bounds the HMAC work a stranger can ask of us."""
MAX_HUB_FIELD = 1024
"""At most this many entries in a list or map of an auth's `hub` field (hub mode)."""

# Close reasons (docs/peer-protocol.md, "Close reasons").
INCOMPATIBLE_VERSION = "incompatible-version"
UNAUTHORIZED = "unauthorized"
UNREACHABLE = "unreachable"
CLOSED = "closed"
TIMEOUT = "timeout"
PROTOCOL_ERROR = "protocol-error"
TOO_LARGE = "too-large"
DUPLICATE = "duplicate"
SELF = "self"
SHUTDOWN = "shutdown"
INTERNAL_ERROR = "internal-error"
TOO_SLOW = "too-slow"
"""The peer does not read what we send fast enough (its queue hit a limit, or a write stalled)."""
BUSY = "busy"
"""Too many connections have not finished their handshake; try again later."""
DEVICE_REMOVED = "device-removed"
"""The peer's device was removed from the (last) space the connection could sync (6.1)."""
# Hub mode (docs/peer-protocol.md, "Hub mode"): close reasons a hub sends...
FORBIDDEN = "forbidden"
TOO_MANY_DEVICES = "too-many-devices"
# ...and the one a daemon closes with when a hub's device key is not the one it pinned.
HUB_KEY_CHANGED = "hub-key-changed"
# ...and reasons of a per-document `error` (the connection stays up).
QUOTA_EXCEEDED = "quota-exceeded"
ENVIRONMENT_TOO_LARGE = "environment-too-large"
REASONS = frozenset(
    {
        INCOMPATIBLE_VERSION,
        UNAUTHORIZED,
        UNREACHABLE,
        CLOSED,
        TIMEOUT,
        PROTOCOL_ERROR,
        TOO_LARGE,
        DUPLICATE,
        SELF,
        SHUTDOWN,
        INTERNAL_ERROR,
        TOO_SLOW,
        BUSY,
        FORBIDDEN,
        TOO_MANY_DEVICES,
        HUB_KEY_CHANGED,
        DEVICE_REMOVED,
    }
)

# y-protocols sync message types (the first varuint of a `sync` message's `m`).
SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2


class CloseConnection(Exception):
    """The connection must close with `reason` (a close reason of section 8): raised anywhere in
    the core and turned into the close message by `PeerConnection`. Raise a subclass, which says
    whose fault it is."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PeerProtocolError(CloseConnection):
    """The remote peer broke the protocol, or is refused or dropped for what it sent or is (its
    auth, its versions, its key, a queue it does not read)."""


class LocalProtocolError(CloseConnection):
    """Our side cannot go on, through no fault of the peer's (a message of ours over the size
    limit, a box counter used up, no common space left after we left one)."""


def encode(msg: dict[str, Any]) -> bytes:
    return cbor2.dumps(msg)


def decode(data: bytes | bytearray | memoryview | str, max_size: int) -> dict[str, Any]:
    """One websocket message -> one CBOR map with a string `t`; anything else is a
    `PeerProtocolError`."""
    if isinstance(data, str):
        raise PeerProtocolError(PROTOCOL_ERROR, "text message; the peer protocol is binary")
    if len(data) > max_size:
        raise PeerProtocolError(TOO_LARGE, f"message of {len(data)} bytes exceeds {max_size}")
    if not data:
        raise PeerProtocolError(PROTOCOL_ERROR, "empty message")
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # CBORDecodeError, and semantic tag decoders may raise others
        raise PeerProtocolError(PROTOCOL_ERROR, f"malformed CBOR: {exc}") from None
    if fp.tell() != len(data):
        raise PeerProtocolError(PROTOCOL_ERROR, "trailing bytes after the CBOR map")
    if not isinstance(obj, dict):
        raise PeerProtocolError(PROTOCOL_ERROR, f"a CBOR {type(obj).__name__}, expected a map")
    t = obj.get("t")
    if not isinstance(t, str):
        raise PeerProtocolError(PROTOCOL_ERROR, "message without a string 't'")
    return obj


# -- field checks ------------------------------------------------------------------------------


def _bytes(msg: dict[str, Any], key: str, size: int | None = None, *, min_size: int = 0) -> bytes:
    value = msg.get(key)
    if not isinstance(value, bytes):
        raise PeerProtocolError(PROTOCOL_ERROR, f"{msg['t']}.{key} must be a byte string")
    if size is not None and len(value) != size:
        raise PeerProtocolError(PROTOCOL_ERROR, f"{msg['t']}.{key} must be {size} bytes")
    if len(value) < min_size:
        raise PeerProtocolError(PROTOCOL_ERROR, f"{msg['t']}.{key} is too short")
    return value


def _str(msg: dict[str, Any], key: str, max_len: int, *, min_len: int = 1) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise PeerProtocolError(
            PROTOCOL_ERROR, f"{msg['t']}.{key} must be a string of {min_len}..{max_len} chars"
        )
    return value


def _uint(msg: dict[str, Any], key: str, limit: int = 1 << 64) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise PeerProtocolError(PROTOCOL_ERROR, f"{msg['t']}.{key} must be an unsigned integer")
    return value


def _tags(msg: dict[str, Any]) -> list[bytes]:
    tags = msg.get("tags")
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise PeerProtocolError(PROTOCOL_ERROR, f"{msg['t']}.tags must be a list of <= {MAX_TAGS}")
    for tag in tags:
        if not isinstance(tag, bytes) or len(tag) != 32:
            raise PeerProtocolError(PROTOCOL_ERROR, f"{msg['t']}.tags must hold 32-byte strings")
    return tags


def versions_of(msg: dict[str, Any]) -> tuple[int | None, int | None]:
    """`proto` and `model` of a hello or close, None where absent or not an integer."""

    def get(key: str) -> int | None:
        value = msg.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return get("proto"), get("model")


def validate_hello(msg: dict[str, Any]) -> None:
    """The fields of a version-1 hello (call only once the versions are known to match)."""
    _str(msg, "device", MAX_DEVICE_ID)
    _str(msg, "name", MAX_NAME, min_len=0)
    _bytes(msg, "key", 32)
    _bytes(msg, "eph", 32)
    _bytes(msg, "nonce", 32)


def validate_close(msg: dict[str, Any]) -> None:
    _str(msg, "reason", MAX_REASON)
    if "detail" in msg:
        _str(msg, "detail", MAX_DETAIL, min_len=0)


def validate_cleartext(msg: dict[str, Any]) -> None:
    """`hello` (versions only: the rest depends on them), `close` and `box`."""
    t = msg["t"]
    if t == "hello":
        _uint(msg, "proto")
        _uint(msg, "model")
    elif t == "close":
        validate_close(msg)
    elif t == "box":
        _uint(msg, "n")
        _bytes(msg, "c", min_size=16)
    else:
        raise PeerProtocolError(PROTOCOL_ERROR, f"unexpected cleartext message {t!r}")


def validate_inner(msg: dict[str, Any]) -> None:
    """A message found inside a box."""
    t = msg["t"]
    if t == "auth":
        _bytes(msg, "sig", 64)
        _tags(msg)
        if "hub" in msg and not isinstance(msg["hub"], dict):
            raise PeerProtocolError(PROTOCOL_ERROR, "auth.hub must be a map")
    elif t == "error":
        _str(msg, "doc", MAX_DOC_ID)
        _str(msg, "reason", MAX_REASON)
        if "detail" in msg:
            _str(msg, "detail", MAX_DETAIL, min_len=0)
    elif t == "spaces":
        _tags(msg)
    elif t == "space-key":
        _str(msg, "space", MAX_DOC_ID)
        _uint(msg, "epoch", 1 << 32)
        _bytes(msg, "secret", 32)
    elif t in ("sync", "awareness"):
        _str(msg, "doc", MAX_DOC_ID)
        _bytes(msg, "m")
    elif t == "close":
        validate_close(msg)
    elif t in ("ping", "pong"):
        pass
    else:
        raise PeerProtocolError(PROTOCOL_ERROR, f"unknown message type {t!r}")


# -- y-protocols sync messages -----------------------------------------------------------------


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_var_uint(data, pos)
    except BadVarUint:
        raise PeerProtocolError(
            PROTOCOL_ERROR, "truncated or overlong varuint in sync message"
        ) from None


def encode_sync(kind: int, payload: bytes) -> bytes:
    """A y-protocols sync message: varuint type, then the payload as a varuint-prefixed array."""
    return write_var_uint(kind) + write_var_uint(len(payload)) + payload


def decode_sync(m: bytes) -> tuple[int, bytes]:
    """-> (type, payload); exactly one message, nothing after it."""
    kind, pos = _read_varuint(m, 0)
    if kind not in (SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE):
        raise PeerProtocolError(PROTOCOL_ERROR, f"unknown sync message type {kind}")
    length, pos = _read_varuint(m, pos)
    if pos + length != len(m):
        raise PeerProtocolError(PROTOCOL_ERROR, "sync message length does not match its payload")
    return kind, bytes(m[pos:])
