"""The operations' own error type and acknowledgement, below every service.

Services raise `OpError(code, message)` with one of the codes here; the local socket answers it
as an error response (docs/local-api.md), the CLI prints it as one line. Services never import the
socket's modules: the codes are the operations' vocabulary, and the socket only carries them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AMBIGUOUS",
    "BAD_INVITE",
    "BAD_PATCH",
    "BAD_PATH",
    "BAD_POINTER",
    "BAD_REQUEST",
    "BAD_UPDATE",
    "EXISTS",
    "FORBIDDEN",
    "INTERNAL",
    "LINK_CONFLICT",
    "LINK_REFUSED",
    "MALFORMED_JSON",
    "NOT_AN_ENVIRONMENT",
    "NOT_FOUND",
    "NOT_SHARED",
    "OPERATION_CODES",
    "STORE_FAILED",
    "UNKNOWN_OP",
    "UUID_MISMATCH",
    "OpError",
    "Pending",
    "arg",
    "is_failure",
]

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

BAD_PATH = "bad-path"  # env.link: a path that cannot be written
LINK_CONFLICT = "link-conflict"  # env.link of a file another environment is linked to
LINK_REFUSED = "link-refused"  # env.link of a file holding something else (retry with overwrite)
AMBIGUOUS = "ambiguous"  # a space name that names several spaces
BAD_INVITE = "bad-invite"
NOT_SHARED = "not-shared"  # the environment is in no space

OPERATION_CODES = frozenset(
    {
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
        BAD_PATH,
        LINK_CONFLICT,
        LINK_REFUSED,
        AMBIGUOUS,
        BAD_INVITE,
        NOT_SHARED,
    }
)


def is_failure(exc: BaseException) -> bool:
    """An error to report, not a cancellation or an interrupt: pycrdt's Rust panics are
    BaseExceptions, yet they are failures like any other (of one document, one link, one
    request), never the daemon's end."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class OpError(Exception):
    """Raised by an operation (or `Pending.wait`): whose fault it is, in a code and a message."""

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
    returns (an `OpError` or other exception from `wait()` becomes an error response instead).
    `wait()` may be cancelled if the client goes away or the daemon stops; the operation has
    already been applied by then, so cancelling only drops the acknowledgement.
    """

    wait: Callable[[], Awaitable[None]]
    result: Any = None


def when_durable(tickets: Iterable[Any], result: Any) -> Any:
    """`result` once every ticket (`store.Ticket`: `await ticket.wait()`) is durable: the
    acknowledgement of an operation that made several writes."""
    waiting = [t for t in tickets if t is not None]
    if not waiting:
        return result

    async def wait() -> None:
        for ticket in waiting:
            await ticket.wait()

    return Pending(wait, result)


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
    """Fetch and type-check one request argument, raising `OpError(BAD_REQUEST)`.

    Omit `default` to make the argument required; a present `null` counts as absent when a
    default is given. `bool` never satisfies `int`; `int` satisfies `float`.
    """
    where = f"{op}: " if op else ""
    value = args.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise OpError(BAD_REQUEST, f"{where}missing argument {name!r}")
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
        raise OpError(BAD_REQUEST, f"{where}argument {name!r} must be {_type_name(kind)}")
    return value
