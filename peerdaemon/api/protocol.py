"""Message shapes, error codes and request validation shared by the server, the clients and the
daemon's Handler (see docs/local-api.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BAD_FRAME",
    "BAD_PATCH",
    "BAD_POINTER",
    "BAD_REQUEST",
    "BAD_UPDATE",
    "ERROR_CODES",
    "EXISTS",
    "FORBIDDEN",
    "FRAME_TOO_LARGE",
    "INTERNAL",
    "MALFORMED_JSON",
    "NOT_AN_ENVIRONMENT",
    "NOT_FOUND",
    "UNKNOWN_OP",
    "UUID_MISMATCH",
    "ApiError",
    "Pending",
    "Request",
    "arg",
    "error_message",
    "is_valid_id",
    "parse_request",
    "push_message",
    "request_id_of",
    "request_message",
    "result_message",
]

# --- error codes -------------------------------------------------------------------------------
BAD_FRAME = "bad-frame"  # payload is not exactly one CBOR map
FRAME_TOO_LARGE = "frame-too-large"  # length prefix above the receiver's limit
BAD_REQUEST = "bad-request"  # map without a valid id/op/args, or an invalid argument
UNKNOWN_OP = "unknown-op"
NOT_FOUND = "not-found"  # environment, pointer target or subscription does not exist
EXISTS = "exists"  # env.import of an id that is already present (without new_id)
MALFORMED_JSON = "malformed-json"
NOT_AN_ENVIRONMENT = "not-an-environment"
BAD_POINTER = "bad-pointer"
BAD_PATCH = "bad-patch"
BAD_UPDATE = "bad-update"
FORBIDDEN = "forbidden"  # peer uid differs from the daemon's
INTERNAL = "internal"
STORE_FAILED = "store-failed"  # applied in memory, but the store could not make it durable
UUID_MISMATCH = "uuid-mismatch"  # env.put of content whose uuid is another id (without force_id)

ERROR_CODES = frozenset(
    {
        BAD_FRAME,
        FRAME_TOO_LARGE,
        BAD_REQUEST,
        UNKNOWN_OP,
        NOT_FOUND,
        EXISTS,
        MALFORMED_JSON,
        NOT_AN_ENVIRONMENT,
        BAD_POINTER,
        BAD_PATCH,
        BAD_UPDATE,
        FORBIDDEN,
        INTERNAL,
        STORE_FAILED,
        UUID_MISMATCH,
    }
)

_ID_MIN = -(2**64)
_ID_MAX = 2**64 - 1


class ApiError(Exception):
    """Raised by a Handler (or `Pending.wait`) to answer a request with an error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(slots=True)
class Pending:
    """Returned by a Handler for an operation already applied in memory but not yet durable.

    The server keeps reading the connection's next requests and sends `result` once `wait()`
    returns (an `ApiError` or other exception from `wait()` becomes an error response instead).
    `wait()` may be cancelled if the client goes away or the daemon stops; the operation has
    already been applied by then, so cancelling only drops the acknowledgement.
    """

    wait: Callable[[], Awaitable[None]]
    result: Any = None


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    op: str
    args: dict[Any, Any] = field(default_factory=dict)


def is_valid_id(value: object) -> bool:
    """Request ids are CBOR integers (major type 0/1 range) or text strings; never bool/null."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _ID_MIN <= value <= _ID_MAX
    return isinstance(value, str)


def request_id_of(msg: Mapping[Any, Any]) -> int | str | None:
    """The request id to echo in an error response: the frame's id if valid, else None."""
    value = msg.get("id")
    return value if is_valid_id(value) else None


def parse_request(msg: Mapping[Any, Any]) -> Request:
    """Validate a decoded frame as a request; raises `ApiError(BAD_REQUEST)`.

    Unknown top-level keys are ignored so that later protocol versions can add fields.
    """
    if "sub" in msg and "op" not in msg:
        raise ApiError(BAD_REQUEST, "clients must not send push messages")
    if "id" not in msg:
        raise ApiError(BAD_REQUEST, "request has no 'id'")
    if not is_valid_id(msg["id"]):
        raise ApiError(BAD_REQUEST, "'id' must be an integer or a text string")
    op = msg.get("op")
    if not isinstance(op, str) or not op:
        raise ApiError(BAD_REQUEST, "'op' must be a non-empty text string")
    args = msg.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise ApiError(BAD_REQUEST, "'args' must be a map")
    elif not all(isinstance(key, str) for key in args):
        raise ApiError(BAD_REQUEST, "the keys of 'args' must be text strings")
    return Request(msg["id"], op, args)


_MISSING: Any = object()


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a text string",
        bytes: "a byte string",
        dict: "a map",
        list: "an array",
        type(None): "null",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def arg(
    args: Mapping[Any, Any],
    name: str,
    kind: type | tuple[type, ...],
    *,
    default: Any = _MISSING,
    op: str | None = None,
) -> Any:
    """Fetch and type-check one request argument, raising `ApiError(BAD_REQUEST)`.

    Omit `default` to make the argument required; a present `null` counts as absent when a
    default is given. `bool` never satisfies `int`; `int` satisfies `float`.
    """
    where = f"{op}: " if op else ""
    value = args.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ApiError(BAD_REQUEST, f"{where}missing argument {name!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = False
    for k in kinds:
        if k is int and isinstance(value, bool):
            continue
        if k is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
            break
        if k is bytes and isinstance(value, bytearray | memoryview):
            value = bytes(value)
            ok = True
            break
        if isinstance(value, k):
            ok = True
            break
    if not ok:
        raise ApiError(BAD_REQUEST, f"{where}argument {name!r} must be {_type_name(kind)}")
    return value


# --- message constructors -----------------------------------------------------------------------
def request_message(req_id: int | str, op: str, args: Mapping[str, Any] | None = None) -> dict:
    msg: dict[str, Any] = {"id": req_id, "op": op}
    if args:
        msg["args"] = dict(args)
    return msg


def result_message(req_id: int | str | None, result: Any) -> dict:
    return {"id": req_id, "result": result}


def error_message(req_id: int | str | None, code: str, message: str) -> dict:
    return {"id": req_id, "error": {"code": code, "message": message}}


def push_message(sub: int, event: Any) -> dict:
    return {"sub": sub, "event": event}
