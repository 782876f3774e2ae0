"""lib0's variable-length unsigned integer, the one number encoding of every Yjs format (updates,
state vectors, the sync protocol): written and read once here for the model, the LAN and the hub."""

from __future__ import annotations

__all__ = ["EMPTY_UPDATE", "BadVarUint", "read_var_uint", "write_var_uint"]

EMPTY_UPDATE = b"\x00\x00"
"""A Yjs v1 update with no structs and an empty delete set: what a diff holds when there is
nothing to send."""


def write_var_uint(n: int) -> bytes:
    """7 bits per byte, low bits first, the high bit set on every byte but the last."""
    if n < 0:
        raise ValueError("varuint must be >= 0")
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class BadVarUint(ValueError):
    """Truncated, or longer than a 64-bit number: each reader says whose fault that is."""


def read_var_uint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """-> (value, the position after it)."""
    value = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise BadVarUint("truncated varuint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise BadVarUint("varuint too long")
