"""Text content in array types: found by reading the Yjs update format, removed by a delete set.

A Y.Text and a Y.Array are the same thing on the wire, a list of items under a parent, so any
Yjs client can write characters (`getText(name).insert(...)`) into a root the layout reads as
an array, and a hand-made update into any nested Y.Array. yrs 0.14 (pycrdt 0.14.13) then never
returns from reading that array when the characters are not all ASCII: it measures a string
item in one unit and indexes it in another. Such items mean nothing to the layout (an order or
reference list holds uuids and references), so the registry deletes them, as a change of its
own that reaches every replica (docs/model.md, "Text in an array").

`scan` takes an update's items (`yupdate.read_items`), works out each item's parent (given, or that of
its origin, looked up in an `ItemIndex` of the document), and returns the ranges of string,
embed and format items whose parent is a root array or a nested Y.Array; `StrayFinder` keeps
the index per document; `delete_update` is an update that deletes them. Decoding is iterative
and bounded by the input (no recursion, no allocation beyond what the bytes announce).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from pycrdt import Doc, Text

from .lib0 import write_var_uint as _uint
from .schema import ORDER_SUFFIX, ROOT_ENTITY_LISTS, ROOT_REF_LIST
from .yupdate import EMBED, FORMAT, GC, STRING, TYPE_ARRAY, Item, Malformed, read_items

__all__ = [
    "ARRAY_ROOTS",
    "ItemIndex",
    "Malformed",
    "StrayFinder",
    "decode",
    "delete_update",
    "has_strays",
    "remove_strays",
    "scan",
    "strays",
]

ARRAY_ROOTS = frozenset({*(k + ORDER_SUFFIX for k in ROOT_ENTITY_LISTS), ROOT_REF_LIST})
"""The roots the layout reads as arrays (docs/model.md)."""

_TEXTUAL = frozenset({STRING, EMBED, FORMAT})


class ItemIndex:
    """The items of a document, by id, each with its parent once known: what an update's items
    are looked up in (their origins, their parent types)."""

    def __init__(self) -> None:
        self._clients: dict[int, tuple[list[int], list[Item]]] = {}

    def find(self, id_: tuple[int, int]) -> Item | None:
        entry = self._clients.get(id_[0])
        if entry is None:
            return None
        starts, items = entry
        k = bisect_right(starts, id_[1]) - 1
        if k >= 0 and id_[1] < items[k].clock + items[k].length:
            return items[k]
        return None

    def add(self, item: Item) -> None:
        starts, items = self._clients.setdefault(item.client, ([], []))
        k = bisect_right(starts, item.clock)
        if k and items[k - 1].clock + items[k - 1].length > item.clock:
            return  # known already (an update seen twice)
        starts.insert(k, item.clock)
        items.insert(k, item)


def scan(
    items: list[Item], index: ItemIndex, array_roots: frozenset[str] | set[str]
) -> tuple[list[tuple[int, int, int]], bool]:
    """Find the parent of each item (given, or its origin's, or its right origin's, looked up
    among `items` and in `index`), add those found to `index`; -> the (client, clock, length)
    of the strays among them, and whether some string, embed or format item's parent could not
    be found (then only a scan of the whole document can tell)."""
    local = ItemIndex()
    for item in items:
        local.add(item)

    def find(id_: tuple[int, int]) -> Item | None:
        return local.find(id_) or index.find(id_)

    def resolve(item: Item) -> bool:
        chain: list[Item] = []
        seen: set[int] = set()
        node = item
        while True:  # iterative: a chain of origins costs no stack
            if node.resolved:
                where = node.where
                break
            if node.parent is not None or node.content == GC:
                where = node.parent  # (an item after a collected one is collected too)
                chain.append(node)
                break
            chain.append(node)
            seen.add(id(node))
            following = None
            for o in (node.origin, node.right_origin):
                f = find(o) if o is not None else None
                if f is not None and f.content != GC:
                    following = f
                    break
            if following is None or id(following) in seen:
                return False
            node = following
        for n in chain:
            n.where, n.resolved = where, True
        return True

    found: list[tuple[int, int, int]] = []
    unknown = False
    for item in items:
        known = resolve(item)
        if known:
            index.add(item)
        if item.content not in _TEXTUAL:
            continue
        if not known:
            unknown = True
            continue
        where = item.where
        if isinstance(where, str):
            stray = where in array_roots
        elif where is None:
            stray = False  # in no type: collected
        else:
            owner = find(where)
            if owner is None:
                unknown = True
                continue
            stray = owner.type_ref == TYPE_ARRAY
        if stray and item.length:
            found.append((item.client, item.clock, item.length))
    return found, unknown


def decode(update: bytes) -> list[Item]:
    """The items of a Yjs v1 update (raises Malformed): what `StrayFinder.check` takes."""
    return read_items(update)


def strays(update: bytes, array_roots: frozenset[str] | set[str]) -> list[tuple[int, int, int]]:
    """(client, clock, length) of every string, embed or format item in `update` (a document's
    whole state) whose parent is a root named in `array_roots` or a nested Y.Array."""
    return scan(read_items(update), ItemIndex(), array_roots)[0]


class StrayFinder:
    """Finds the strays a document's updates bring, one update at a time, without decoding the
    whole document on every update: it keeps an index of the document's items, built from the
    whole state the first time an update holds text whose parent it cannot tell (typing in a
    response body: the origins are in the document), and kept up to date with every update
    it is shown. A lookup that misses (an update it was not shown) rebuilds it."""

    WAITING = 10_000
    """Text items that were not in the document yet (their update waits in yrs for what it
    depends on), remembered to look for again: at most this many."""

    def __init__(self, array_roots: frozenset[str] = ARRAY_ROOTS) -> None:
        self.array_roots = array_roots
        self.index: ItemIndex | None = None
        self.waiting: list[Item] = []

    def learn(self, update: bytes) -> None:
        """An update the document made itself (a local write): index its items."""
        if self.index is not None:
            scan(read_items(update), self.index, self.array_roots)

    def check(self, doc: Doc, update: bytes | list[Item]) -> list[tuple[int, int, int]]:
        """The strays in `doc` after it applied `update` (or its `decode`d items; raises
        Malformed)."""
        items = read_items(update) if isinstance(update, bytes) else update
        textual = [i for i in items if i.content in _TEXTUAL]
        if not self.waiting:
            if self.index is None and not textual:
                return []
            if self.index is not None:
                found, unknown = scan(items, self.index, self.array_roots)
                if not unknown:
                    return found
        found = self.rebuild(doc)
        index = self.index
        assert index is not None
        waiting = [i for i in (*self.waiting, *textual) if index.find((i.client, i.clock)) is None]
        self.waiting = waiting[-self.WAITING :]
        return found

    def rebuild(self, doc: Doc) -> list[tuple[int, int, int]]:
        """Index the whole document; -> its strays."""
        self.index = ItemIndex()
        return scan(read_items(doc.get_update()), self.index, self.array_roots)[0]


def delete_update(ranges: list[tuple[int, int, int]]) -> bytes:
    """A Yjs v1 update with no structs and a delete set of `ranges` (client, clock, length)."""
    by_client: dict[int, list[tuple[int, int]]] = {}
    for client, clock, length in ranges:
        by_client.setdefault(client, []).append((clock, length))
    out = bytearray(_uint(0))
    out += _uint(len(by_client))
    for client, spans in sorted(by_client.items()):
        out += _uint(client) + _uint(len(spans))
        for clock, length in sorted(spans):
            out += _uint(clock) + _uint(length)
    return bytes(out)


def has_strays(doc: Doc, roots: Iterable[str] = ARRAY_ROOTS) -> bool:
    """Whether a root array (of `roots`, all by default) holds anything but plain values and
    shared types, seen through a text view of it: its diff skips plain values (never
    indexed), so it cannot hang."""
    for name in roots:
        for insert, attrs in doc.get(name, type=Text).diff():
            if attrs or isinstance(insert, str) or not hasattr(insert, "integrated"):
                return True
    return False


def remove_strays(doc: Doc, roots: Iterable[str] = ARRAY_ROOTS) -> int:
    """Delete the string, embed and format items of the document's array types (a change of
    the document's own, in a transaction of its own); -> how many items. Cheap when there are
    none (the usual case): the whole state is decoded only once a root array of `roots` shows
    some (then all are deleted, wherever they are)."""
    if not has_strays(doc, roots):
        return 0
    ranges = strays(doc.get_update(), ARRAY_ROOTS)
    if ranges:
        doc.apply_update(delete_update(ranges))
    return len(ranges)
