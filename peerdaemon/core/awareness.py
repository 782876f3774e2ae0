"""The y-protocols awareness update encoding, shared by the hub's y-websocket rooms, the LAN peer
protocol's `awareness` message and the presence service (docs/presence.md).

An awareness update is `varuint n`, then `n` entries of `varuint clientID, varuint clock,
varstring state` where the state is JSON text and `null` removes the client's state. It lives
here, below every service, so the hub (a high layer) and the presence service read one
definition; each caller turns `AwarenessError` into its own peer's fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from ..model.lib0 import BadVarUint, read_var_uint, write_var_uint

__all__ = [
    "MAX_CLIENT_ID",
    "MAX_STATE",
    "AwarenessEntry",
    "AwarenessError",
    "decode_awareness",
    "encode_awareness",
]

MAX_CLIENT_ID = (1 << 53) - 1
"""JavaScript's largest safe integer: a client id a y-websocket client can hold."""
MAX_STATE = 8192
"""Largest awareness state (its JSON text, in bytes) presence accepts from anyone: the daemons
refuse (and the hub does not relay) a larger one. Cursors and a name fit many times over."""


class AwarenessError(ValueError):
    """Bytes that are not an awareness update (truncated, or a state that is not JSON)."""


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client: int
    clock: int
    state: str  # JSON text as sent; "null" removes the client's state

    @property
    def removed(self) -> bool:
        return self.state == "null"


def _read(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_var_uint(data, pos)
    except BadVarUint as exc:
        raise AwarenessError(str(exc)) from None


def decode_awareness(payload: bytes) -> list[AwarenessEntry]:
    """Decode an awareness update; states must be JSON (checked, so nobody relays junk)."""
    count, pos = _read(payload, 0)
    entries = []
    for _ in range(count):
        client, pos = _read(payload, pos)
        clock, pos = _read(payload, pos)
        n, pos = _read(payload, pos)
        if pos + n > len(payload):
            raise AwarenessError("truncated awareness state")
        raw, pos = payload[pos : pos + n], pos + n
        try:
            text = bytes(raw).decode("utf-8")
            if text != "null":
                json.loads(text)
        except (UnicodeDecodeError, ValueError):
            raise AwarenessError("awareness state is not JSON") from None
        entries.append(AwarenessEntry(client, clock, text))
    return entries


def encode_awareness(entries: Iterable[AwarenessEntry]) -> bytes:
    items = list(entries)
    out = [write_var_uint(len(items))]
    for e in items:
        state = e.state.encode("utf-8")
        out.append(write_var_uint(e.client))
        out.append(write_var_uint(e.clock))
        out.append(write_var_uint(len(state)))
        out.append(state)
    return b"".join(out)
