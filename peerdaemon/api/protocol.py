"""Message shapes, error codes and request validation shared by the server, the clients and the
daemon's Handler (see docs/local-api.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import (
    BAD_PATCH,
    BAD_POINTER,
    BAD_REQUEST,
    BAD_UPDATE,
    EXISTS,
    FORBIDDEN,
    INTERNAL,
    LINK_CONFLICT,
    MALFORMED_JSON,
    NOT_AN_ENVIRONMENT,
    NOT_FOUND,
    OPERATION_CODES,
    STORE_FAILED,
    UNKNOWN_OP,
    UUID_MISMATCH,
    OpError,
    Pending,
    arg,
)

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
    "LINK_CONFLICT",
    "STORE_FAILED",
    "OpError",
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
# The operations' codes live with the operations (core/errors.py); the socket adds its framing ones.
BAD_FRAME = "bad-frame"  # payload is not exactly one CBOR map
FRAME_TOO_LARGE = "frame-too-large"  # length prefix above the receiver's limit

ERROR_CODES = OPERATION_CODES | {BAD_FRAME, FRAME_TOO_LARGE}

_ID_MIN = -(2**64)
_ID_MAX = 2**64 - 1


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
    """Validate a decoded frame as a request; raises `OpError(BAD_REQUEST)`.

    Unknown top-level keys are ignored so that later protocol versions can add fields.
    """
    if "sub" in msg and "op" not in msg:
        raise OpError(BAD_REQUEST, "clients must not send push messages")
    if "id" not in msg:
        raise OpError(BAD_REQUEST, "request has no 'id'")
    if not is_valid_id(msg["id"]):
        raise OpError(BAD_REQUEST, "'id' must be an integer or a text string")
    op = msg.get("op")
    if not isinstance(op, str) or not op:
        raise OpError(BAD_REQUEST, "'op' must be a non-empty text string")
    args = msg.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise OpError(BAD_REQUEST, "'args' must be a map")
    elif not all(isinstance(key, str) for key in args):
        raise OpError(BAD_REQUEST, "the keys of 'args' must be text strings")
    return Request(msg["id"], op, args)


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
