"""The mock runner's line protocol (docs/mock-runner.md), without I/O.

Commands and events are JSON objects, one per line. `LineReader` cuts the runner's stdout into
lines under a size cap; `parse_event` turns one line into a `RunnerEvent`, or raises
`RunnerProtocolError` for a line that breaks the protocol (the shell then restarts the runner:
a runner that writes garbage is not one we can trust to have done what we asked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_EVENT_LINE",
    "EVENTS",
    "LineReader",
    "RunnerEvent",
    "RunnerProtocolError",
    "encode",
    "parse_event",
]

MAX_EVENT_LINE = 1 << 20
"""An event line longer than this is a broken runner (transaction bodies are capped far below)."""

EVENTS = frozenset(
    {"ready", "started", "updated", "stopped", "error", "transaction", "blocked", "pong"}
)


class RunnerProtocolError(Exception):
    """The runner wrote something the protocol does not allow."""


@dataclass(frozen=True)
class RunnerEvent:
    kind: str
    id: str | None
    data: dict[str, Any] = field(default_factory=dict)


class LineReader:
    """Bytes in, complete lines out; a line past the cap is an error, not unbounded memory."""

    def __init__(self, max_line: int = MAX_EVENT_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            lines.append(bytes(self._buffer[start:end]))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line or any(len(line) > self.max_line for line in lines):
            raise RunnerProtocolError(f"runner line longer than {self.max_line} bytes")
        return lines


def encode(command: dict[str, Any]) -> bytes:
    """One command line; `allow_nan=False` because the runner's JSON.parse refuses NaN."""
    return json.dumps(command, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def parse_event(line: bytes) -> RunnerEvent:
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunnerProtocolError(f"runner wrote a line that is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RunnerProtocolError("runner wrote a JSON value that is not an object")
    kind = value.pop("event", None)
    if kind not in EVENTS:
        raise RunnerProtocolError(f"runner wrote an unknown event {kind!r}")
    server = value.pop("id", None)
    if server is not None and not isinstance(server, str):
        raise RunnerProtocolError(f"runner event {kind} with a non-string id")
    if kind in ("started", "updated", "stopped", "transaction") and server is None:
        raise RunnerProtocolError(f"runner event {kind} without an id")
    return RunnerEvent(kind, server, value)
