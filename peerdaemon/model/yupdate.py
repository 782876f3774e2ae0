"""Reading the Yjs update format (v1) without applying it: the items an update carries.

What the registry's stray check (`strays.py`) and the model's version check (`migrations.py`)
read from an update's bytes before, or instead of, a document applying them. Decoding is
iterative and bounded by the input: no recursion, no allocation beyond what the bytes announce.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .lib0 import BadVarUint, read_var_uint

__all__ = [
    "NO_VALUE",
    "DeleteSet",
    "Item",
    "Malformed",
    "Reader",
    "covered",
    "read_delete_set",
    "read_items",
    "read_state_vector",
]

# content refs (Yjs `contentRefs`) and type refs (`typeRefs`)
GC, DELETED, JSON, BINARY, STRING, EMBED, FORMAT, TYPE, ANY, DOC, SKIP = range(11)
TYPE_ARRAY, TYPE_XML_ELEMENT, TYPE_XML_HOOK = 0, 3, 5

NO_VALUE = object()
"""An item's `value` when it is not one number (text, a map, several values...)."""


class Malformed(ValueError):
    """The bytes are not a Yjs v1 update this decoder understands."""


@dataclass(slots=True)
class Item:
    client: int
    clock: int
    length: int
    content: int
    origin: tuple[int, int] | None
    right_origin: tuple[int, int] | None
    parent: str | tuple[int, int] | None  # a root's name, or the id of the type's item
    sub: str | None = None  # a map entry's key (parentSub)
    type_ref: int | None = None  # for a type item
    value: object = NO_VALUE  # a single lib0 number of an Any item
    where: str | tuple[int, int] | None = None  # the parent, given or found through origins
    resolved: bool = False


_FIXED = {124: 4, 123: 8, 122: 8}  # float32, float64, bigint
_EMPTY = frozenset({127, 126, 121, 120})  # undefined, null, false, true


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise Malformed("unexpected end of update")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self) -> int:
        try:
            value, self.pos = read_var_uint(self.data, self.pos)
        except BadVarUint as exc:
            raise Malformed(str(exc)) from None
        return value

    def count(self) -> int:
        """A count of things to come, each at least a byte long."""
        n = self.uint()
        if n > len(self.data) - self.pos:
            raise Malformed("a count beyond the end of the update")
        return n

    def signed(self) -> int:  # lib0's signed varint
        b = self.byte()
        negative, value, shift = b & 0x40, b & 0x3F, 6
        while b & 0x80:
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
        return -value if negative else value

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Malformed("unexpected end of update")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def string(self) -> str:
        return self.raw(self.uint()).decode("utf-8", "surrogatepass")

    def any(self) -> object:
        """One lib0 `Any`: a number is returned, anything else read past (`NO_VALUE`)."""
        tag = self.byte()
        if tag == 125:
            return self.signed()
        if tag in _FIXED:
            data = self.raw(_FIXED[tag])
            return struct.unpack({124: ">f", 123: ">d", 122: ">q"}[tag], data)[0]
        todo = [tag]  # tags still to read past, last first; -1: a map's key
        while todo:  # iterative: nesting costs no stack
            tag = todo.pop()
            if tag == -1:
                self.raw(self.uint())
                continue
            if tag is None:
                tag = self.byte()
            if tag in _EMPTY:
                continue
            if tag == 125:
                self.signed()
            elif tag in _FIXED:
                self.raw(_FIXED[tag])
            elif tag in (119, 116):  # string, bytes
                self.raw(self.uint())
            elif tag == 118:  # object: key, value, key, value...
                todo += [None, -1] * self.count()
            elif tag == 117:  # array
                todo += [None] * self.count()
            else:
                raise Malformed(f"unknown value tag {tag}")
        return NO_VALUE


def _utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def read_items(update: bytes) -> list[Item]:
    """The items of a Yjs v1 update, GC items included, skips left out (raises Malformed)."""
    r = Reader(update)
    items: list[Item] = []
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        for _ in range(count):
            info = r.byte()
            ref = info & 0x1F
            if ref in (GC, SKIP):
                length = r.uint()
                if ref == GC:
                    items.append(Item(client, clock, length, GC, None, None, None))
                clock += length
                continue
            origin = (r.uint(), r.uint()) if info & 0x80 else None
            right = (r.uint(), r.uint()) if info & 0x40 else None
            parent: str | tuple[int, int] | None = None
            sub: str | None = None
            if not info & 0xC0:
                parent = r.string() if r.uint() == 1 else (r.uint(), r.uint())
                if info & 0x20:
                    sub = r.string()  # parentSub: a map entry
            type_ref = None
            value: object = NO_VALUE
            if ref == DELETED:
                length = r.uint()
            elif ref == JSON:
                length = r.uint()
                for _ in range(length):
                    r.string()
            elif ref == BINARY:
                r.raw(r.uint())
                length = 1
            elif ref == STRING:
                length = _utf16_len(r.string())
            elif ref == EMBED:
                r.string()
                length = 1
            elif ref == FORMAT:
                r.string()
                r.string()
                length = 1
            elif ref == TYPE:
                type_ref = r.uint()
                if type_ref in (TYPE_XML_ELEMENT, TYPE_XML_HOOK):
                    r.string()
                length = 1
            elif ref == ANY:
                length = r.uint()
                values = [r.any() for _ in range(length)]
                if length == 1:
                    value = values[0]
            elif ref == DOC:
                r.string()
                r.any()
                length = 1
            else:
                raise Malformed(f"unknown content ref {ref}")
            items.append(
                Item(client, clock, length, ref, origin, right, parent, sub, type_ref, value)
            )
            clock += length
    return items


# -- state vectors and delete sets ----------------------------------------------------------------

DeleteSet = dict[int, list[tuple[int, int]]]
"""client -> sorted (start, end) clock ranges."""


def read_state_vector(sv: bytes) -> dict[int, int]:
    """client -> clock of an encoded state vector (ValueError on bytes that are not one)."""
    out: dict[int, int] = {}
    n, pos = read_var_uint(sv, 0)
    for _ in range(n):
        client, pos = read_var_uint(sv, pos)
        clock, pos = read_var_uint(sv, pos)
        out[client] = clock
    if pos != len(sv):
        raise ValueError("bytes after the state vector")
    return out


def read_delete_set(data: bytes, pos: int) -> DeleteSet:
    """The delete set encoded at `pos` (after an update's structs)."""
    out: DeleteSet = {}
    clients, pos = read_var_uint(data, pos)
    for _ in range(clients):
        client, pos = read_var_uint(data, pos)
        count, pos = read_var_uint(data, pos)
        ranges = out.setdefault(client, [])
        for _ in range(count):
            clock, pos = read_var_uint(data, pos)
            length, pos = read_var_uint(data, pos)
            ranges.append((clock, clock + length))
    for ranges in out.values():
        ranges.sort()
    return out


def covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether sorted `ranges` cover [start, end) (ranges may touch or overlap)."""
    for a, b in ranges:
        if a <= start < b:
            start = b
            if start >= end:
                return True
        elif a > start:
            return False
    return start >= end
