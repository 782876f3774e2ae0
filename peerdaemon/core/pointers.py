"""Which parts of an environment a change touched, as JSON Pointers for subscribers."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from itertools import compress
from operator import is_not
from typing import Any

from pycrdt import Array, Doc, Map
from pycrdt import _pycrdt as _raw

from ..model.layout import ENV_ROOT
from ..model.schema import KINDS, ORDER_SUFFIX, ROOT_ENTITY_LISTS, ROOT_REF_LIST

MAX_PATHS = 64
_ABSENT: Any = object()


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def changed_paths(old: Any, new: Any, limit: int = MAX_PATHS) -> list[str]:
    """The deepest differing JSON Pointers between two JSON values (`[""]`: the whole value).

    Lists of different lengths are reported whole; past `limit` paths the parent is reported.
    """
    out: list[str] = []
    _walk(old, new, "", out)
    if len(out) > limit:
        return _collapse(out, limit)
    return out


def _walk(old: Any, new: Any, path: str, out: list[str]) -> None:
    if old is new or (type(old) is type(new) and old == new):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if a is b:  # shared with the JSON before (a patch changes copies: model.prepare)
                continue
            sub = f"{path}/{_escape(key)}"
            if a is _ABSENT or b is _ABSENT:
                out.append(sub)
            else:
                _walk(a, b, sub, out)
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        # the items not shared with the list before, found at C speed: a big environment's
        # routes are walked only where they changed
        for i in compress(range(len(new)), map(is_not, old, new)):
            _walk(old[i], new[i], f"{path}/{i}", out)
        return
    out.append(path)


def _collapse(paths: list[str], limit: int) -> list[str]:
    depth = max(p.count("/") for p in paths)
    while depth > 0:
        depth -= 1
        cut = sorted({"/".join(p.split("/")[: depth + 1]) for p in paths})
        if len(cut) <= limit:
            return cut
    return [""]


# -- from a transaction's events ---------------------------------------------------------------

_ENTITY_ROOTS = dict(ROOT_ENTITY_LISTS)
_ORDER_ROOTS = {key + ORDER_SUFFIX: key for key in ROOT_ENTITY_LISTS}
_NOT_IN_ENV_MAP = frozenset({*ROOT_ENTITY_LISTS, ROOT_REF_LIST})
"""Keys of the environment map that the export takes from root types instead."""
_ENTITY = (_raw.Map, dict)
"""What an entity map's value is, read at the binding's level, when the export holds it."""
_ROOTS: weakref.WeakKeyDictionary[Doc, dict[str, Any]] = weakref.WeakKeyDictionary()
"""Per document, the root types `Touched` reads, at the binding's level: those do not keep
the document alive (pycrdt's own wrappers would, from this weak dictionary's values)."""


def _roots(doc: Doc) -> dict[str, Any]:
    """The root types `Touched` reads, by name, looked up once per document (`Doc.get`
    costs a transaction each, on every merge)."""
    roots = _ROOTS.get(doc)
    if roots is None:
        roots = {name: doc.get(name, type=Map).integrated for name in (ENV_ROOT, *_ENTITY_ROOTS)}
        roots.update(
            (name, doc.get(name, type=Array).integrated) for name in (*_ORDER_ROOTS, ROOT_REF_LIST)
        )
        _ROOTS[doc] = roots
    return roots


class Touched:
    """The JSON Pointers that transactions on an environment's document touch, told from their
    events (pycrdt's observe_deep on the layout's roots, docs/model.md) while `watch` is open.

    Diffing the JSON before and after costs two exports of the whole environment; the events
    cost what changed (and, for a change inside an entity, a look at its list's order). The
    pointers are those of the diff where an edit stays inside one value (a field, a text, an
    item of a list); where entities come or go or move, the whole list (and the references,
    which the export mends to follow) is reported instead of each place that shifted.
    """

    def __init__(self, doc: Doc) -> None:
        self.doc = doc
        self.events: list[tuple[str, list[Any], list[str] | None]] = []
        """(root, path in it, the map keys changed there, or None: the value at path itself)."""
        self.failed = False

    @contextmanager
    def watch(self) -> Iterator[Touched]:
        subscriptions = []
        try:
            for name, root in _roots(self.doc).items():
                subscriptions.append(root.observe_deep(partial(self._on_events, name)))
            yield self
        finally:
            for subscription in subscriptions:
                subscription.drop()

    def _on_events(self, root: str, events: list[Any]) -> None:
        try:
            for event in events:
                keys = getattr(event, "keys", None)
                names = [k for k in keys if type(k) is str] if isinstance(keys, dict) else None
                self.events.append((root, list(event.path), names))
        except Exception:  # never into yrs: the paths are then "" (everything)
            self.failed = True

    def pointers(self, limit: int = MAX_PATHS) -> list[str]:
        """The touched pointers, none under another; `[""]` if the events could not be read."""
        if self.failed:
            return [""]
        try:
            found: dict[str, None] = {}
            orders: dict[Any, dict[str, int]] = {}
            for root, path, keys in self.events:
                for tokens in self._tokens(root, path, keys, orders):
                    found["".join(f"/{_escape(str(t))}" for t in tokens)] = None
        except Exception:
            return [""]
        out = _outermost(list(found))
        return _collapse(out, limit) if len(out) > limit else out

    def _tokens(
        self, root: str, path: list[Any], keys: list[str] | None, orders: dict[Any, dict[str, int]]
    ) -> list[list[Any]]:
        """The JSON tokens of one event (a list of pointers, as token lists)."""
        leaves = [[*path, k] for k in keys] if keys is not None else [path]
        if root == ENV_ROOT:
            return [t for t in leaves if t and t[0] not in _NOT_IN_ENV_MAP]
        if root == ROOT_REF_LIST:
            return [[ROOT_REF_LIST, *t] for t in leaves]
        if root in _ORDER_ROOTS:  # moved (the references are another list)
            return [[_ORDER_ROOTS[root]]]
        if not path:  # entities added, deleted or replaced
            return self._moved(root)
        roots = _roots(self.doc)
        items = Map(_integrated=roots[root], _doc=self.doc)
        order = Array(_integrated=roots[root + ORDER_SUFFIX], _doc=self.doc)
        at = _index(items, order, path[0], orders)
        if at is None:
            return self._moved(root)
        kind = KINDS[_ENTITY_ROOTS[root]]
        entity = items[path[0]]
        keyed = keys is not None
        return [[root, at, *self._inside(entity, kind, t[1:], keyed, orders)] for t in leaves]

    def _inside(
        self, entity: Any, kind: Any, rest: list[Any], keyed: bool, orders: dict[Any, Any]
    ) -> list[Any]:
        """The tokens under an entity; an entity list in it (a route's responses) is indexed
        as its export orders it. `keyed`: the last token is a key changed in the map before it."""
        if not rest:
            return []
        head = rest[0]
        if isinstance(head, str) and head.endswith(ORDER_SUFFIX):
            base = head[: -len(ORDER_SUFFIX)]
            if base in kind.entity_lists:
                return [base]
        if head in kind.entity_lists:
            if len(rest) == 1 or (keyed and len(rest) == 2) or not isinstance(entity, Map):
                return [head]  # the list itself: entities came or went
            sub = entity.get(head)
            order = entity.get(head + ORDER_SUFFIX)
            if not isinstance(sub, Map) or not isinstance(order, Array):
                return [head]
            at = _index(sub, order, rest[1], orders)
            if at is None:
                return [head]
            child = KINDS[kind.entity_lists[head]]
            return [head, at, *self._inside(sub[rest[1]], child, rest[2:], keyed, orders)]
        return rest

    def _moved(self, key: str) -> list[list[Any]]:
        """Entities of `key` came or went: the list, and the references, which the export
        mends to hold every route and folder once (model/repair.py)."""
        if key not in ("routes", "folders"):
            return [[key]]
        if key == "folders" or len(self.doc.get("folders", type=Map)):
            return [[key], [ROOT_REF_LIST], ["folders"]]
        return [[key], [ROOT_REF_LIST]]


def _index(items: Map, order: Array, uid: Any, orders: dict[Any, dict[str, int]]) -> int | None:
    """Where the export puts entity `uid` of `items` (layout.assemble: first in the order array,
    then the others by uuid); None if it exports none."""
    key = id(items.integrated)
    places = orders.get(key)
    if places is not None:
        return places.get(uid)
    # read at the binding's level, in one transaction: pycrdt's `items()` and `to_py()` wrap
    # every value and open a transaction for each (100 us for 11 routes, on every merged
    # change of a subscribed environment)
    with items.doc.transaction() as t:
        txn, raw, listed = t._txn, items.integrated, order.integrated
        keys = set(raw.keys(txn))
        if not uid or uid not in keys or not isinstance(raw.get(txn, uid), _ENTITY):
            return None
        # the usual case: `uid` is in the order array, after only the entities before it
        seen: set[str] = set()
        for i in range(listed.len(txn)):
            u = listed.get(txn, i)
            if u == uid:
                return len(seen)
            if type(u) is str and u and u in keys and u not in seen:
                if isinstance(raw.get(txn, u), _ENTITY):
                    seen.add(u)
        valid = {k for k in keys if k and isinstance(raw.get(txn, k), _ENTITY)}
        order_ids = [listed.get(txn, i) for i in range(listed.len(txn))]
    ids: list[str] = []
    seen = set()
    for u in order_ids:
        if isinstance(u, str) and u in valid and u not in seen:
            seen.add(u)
            ids.append(u)
    ids.extend(sorted(valid - seen))
    places = orders[key] = {u: i for i, u in enumerate(ids)}
    return places.get(uid)


def _outermost(paths: list[str]) -> list[str]:
    """`paths` without those under another of them ("/routes/1/x" goes when "/routes" is in)."""
    kept = set(paths)
    return [p for p in paths if not any(p[:i] in kept for i in _prefix_ends(p))]


def _prefix_ends(path: str) -> list[int]:
    return [i for i, c in enumerate(path) if c == "/"]
