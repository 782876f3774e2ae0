"""The Yjs layout of an environment (docs/model.md): building shared types and reading them back.

Reading never trusts the document: any Yjs client may have written any shape, so `read()` keeps
what fits the layout, drops what cannot be an entity, and leaves the rest to `repair`.
"""

from __future__ import annotations

import math
import re
from itertools import compress
from operator import is_not
from typing import Any

from pycrdt import Array, Doc, Map, Text
from pycrdt import _pycrdt as _raw

from .schema import KINDS, MAX_DEPTH, ORDER_SUFFIX, ROOT_ENTITY_LISTS, ROOT_REF_LIST, Kind

ENV_ROOT = "environment"
META_ROOT = "meta"
GENERIC = KINDS["generic"]


def root_map(doc: Doc, name: str) -> Map:
    return doc.get(name, type=Map)


def root_array(doc: Doc, name: str) -> Array:
    return doc.get(name, type=Array)


# ---------------------------------------------------------------------------------------------
# JSON -> new shared types (preliminary, integrated when assigned into the document)


def build_value(value: Any, kind: Kind = GENERIC) -> Any:
    """A shared type (or plain value) for a JSON value that is not yet in the document."""
    if isinstance(value, dict):
        return Map(build_fields(value, kind))
    if isinstance(value, list):
        return Array([build_value(v) for v in value])
    return storable(value)


def storable(value: Any) -> Any:
    """A prepared scalar as the document must hold it.

    `prepare` writes integers beyond 2**53 as JavaScript writes them (exact ints), but pycrdt
    would store those as Yjs BigInts (or panic past 64 bits): they go in as the double they are.
    """
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not -_MAX_SAFE <= value <= _MAX_SAFE
    ):
        return float(value)
    return value


def build_fields(obj: dict[str, Any], kind: Kind) -> dict[str, Any]:
    """The entries of a Y.Map for one JSON object of a known kind."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in kind.texts and isinstance(value, str):
            out[key] = Text(value)
        elif key in kind.entity_lists and isinstance(value, list):
            sub = KINDS[kind.entity_lists[key]]
            out[key] = Map({e["uuid"]: Map(build_fields(e, sub)) for e in value})
            out[key + ORDER_SUFFIX] = Array([e["uuid"] for e in value])
        elif key in kind.object_lists and isinstance(value, list):
            sub = KINDS[kind.object_lists[key]]
            out[key] = Array([build_value(v, sub) for v in value])
        elif key in kind.ref_lists and isinstance(value, list):
            out[key] = Array([js_value(v) for v in value])
        else:
            out[key] = build_value(value)
    return out


# ---------------------------------------------------------------------------------------------
# document -> JSON (before repair)


_JS_EXPONENT = 1e21
"""From here on `JSON.stringify` writes an integral number with an exponent (1e+21)."""

_MAX_SAFE = 2**53
_INF = float("inf")


def js_value(value: Any) -> Any:
    """A JSON value as JavaScript's `JSON.parse` holds it, so the document can store it.

    Integers beyond 2**53 are doubles in JavaScript; pycrdt would store them as Yjs BigInts
    (which JavaScript clients read as BigInt, which JSON.stringify refuses), reads some of them
    back rounded through a double, and panics on integers beyond 64 bits. `JSON.stringify`
    writes non-finite numbers (Python's json reads NaN, Infinity) as null. A lone UTF-16
    surrogate ("\\ud800" in a file) cannot be UTF-8 (pycrdt panics); Yjs writes it as U+FFFD.
    """
    if isinstance(value, str):
        return _well_formed(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if -_MAX_SAFE <= value <= _MAX_SAFE:
            return value
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_well_formed(k): js_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [js_value(v) for v in value]
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _well_formed(s: str) -> str:
    if not _SURROGATE.search(s):
        return s
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def normalize(value: Any) -> Any:
    """JSON as JavaScript writes it: pycrdt hands every number back as a float."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < _JS_EXPONENT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


class NotJson(ValueError):
    """What `prepared_value` met is not JSON, or too deep; `repair.check_json` says where."""


def prepared_value(value: Any, depth: int = 0) -> Any:
    """`normalize(js_value(value))` in one pass: a fresh copy as the document will export it.

    Every write of the daemon goes through this, so it dispatches on exact types, most common
    first, and skips the surrogate scan for ASCII strings. Raises NotJson (or AttributeError for
    a key that is no string) on what is not JSON or nested deeper than MAX_DEPTH.
    """
    t = type(value)
    if t is str:
        return value if value.isascii() else _well_formed(value)
    if t is dict:
        if depth >= MAX_DEPTH:
            if depth > MAX_DEPTH:
                raise NotJson
            for v in value.values():
                if type(v) is dict or type(v) is list:
                    raise NotJson
        depth += 1
        return {
            (k if k.isascii() else _well_formed(k)): prepared_value(v, depth)
            for k, v in value.items()
        }
    if t is list:
        if depth >= MAX_DEPTH:
            if depth > MAX_DEPTH:
                raise NotJson
            for v in value:
                if type(v) is dict or type(v) is list:
                    raise NotJson
        depth += 1
        return [prepared_value(v, depth) for v in value]
    if t is int:
        return value if -_MAX_SAFE <= value <= _MAX_SAFE else normalize(js_value(value))
    if t is float:
        return normalize(js_value(value))
    if t is bool or value is None:
        return value
    raise NotJson


_NOTHING: Any = object()


def prepared_along(value: Any, base: Any, depth: int = 0) -> Any:
    """`prepared_value(value)` for a value made from `base`, a prepared value, by changing copies
    of some of its containers (a JSON Patch applied along `operations.patch_along`).

    What `value` still shares with `base` at the same place is prepared already (a fixed point)
    and is kept as it is, shared: the cost follows the copied containers, not the whole value,
    and later comparisons with `base` stop at the shared parts (`is` before `==`).
    """
    if value is base:
        return base
    t = type(value)
    if depth >= MAX_DEPTH or t is not type(base) or (t is not dict and t is not list):
        return prepared_value(value, depth)
    depth += 1
    if t is dict:
        get = base.get
        out: dict[str, Any] = {}
        for k, v in value.items():
            old = get(k, _NOTHING)
            key = k if k.isascii() else _well_formed(k)
            if v is old:
                out[key] = v
            elif old is not _NOTHING and (type(v) is dict or type(v) is list):
                out[key] = prepared_along(v, old, depth)
            else:
                out[key] = prepared_value(v, depth)
        return out
    n = len(base)
    if len(value) == n:  # the items not shared at their place, found at C speed
        items = list(value)
        places = list(compress(range(n), map(is_not, value, base)))
        # base's items by identity: those moved are kept (one changed place is no move)
        known = {id(x): x for x in base} if len(places) > 1 else {}
        for i in places:
            v = value[i]
            if type(v) is dict or type(v) is list:
                if known.get(id(v)) is not v:
                    items[i] = prepared_along(v, base[i], depth)
            else:
                items[i] = prepared_value(v, depth)
        return items
    items = []
    moved: dict[int, Any] | None = None  # base's items by identity: an insert shifts the rest
    for i, v in enumerate(value):
        old = base[i] if i < n else _NOTHING
        if v is old:
            items.append(v)
            continue
        if type(v) is dict or type(v) is list:
            if moved is None:
                moved = {id(x): x for x in base}
            if moved.get(id(v)) is v:
                items.append(v)
            elif old is not _NOTHING:
                items.append(prepared_along(v, old, depth))
            else:
                items.append(prepared_value(v, depth))
        else:
            items.append(prepared_value(v, depth))
    return items


ABSENT: Any = object()
"""What a value no environment can hold reads as; it is dropped from its map or array."""

_RawMap = _raw.Map
_RawArray = _raw.Array
_RawText = _raw.Text


def _start(raw: Any, txn: Any, depth: int) -> tuple[Any, Any]:
    """(JSON value or ABSENT, iterator over its children as (key, raw) pairs or None)."""
    t = type(raw)
    if t is str or t is bool or raw is None:
        return raw, None
    if t is float:
        if raw != raw or raw in (_INF, -_INF):
            return ABSENT, None
        return (int(raw) if raw.is_integer() and -_JS_EXPONENT < raw < _JS_EXPONENT else raw), None
    if t is int:
        return (raw if -_MAX_SAFE <= raw <= _MAX_SAFE else normalize(float(raw))), None
    if t is _RawText:
        return raw.get_string(txn), None
    if depth > MAX_DEPTH:
        return ABSENT, None
    if t is _RawMap:
        return {}, ((k, raw.get(txn, k)) for k in raw.keys(txn))
    if t is _RawArray:
        return [], ((None, raw.get(txn, i)) for i in range(raw.len(txn)))
    if t is dict:  # a JSON object a client stored as one value (Yjs ContentAny)
        return {}, iter(raw.items())
    if t is list:
        return [], ((None, v) for v in raw)
    # XmlFragment, XmlElement, XmlText, a sub-document (Doc), bytes (bytearray)...
    return ABSENT, None


def plain(raw: Any, txn: Any, depth: int) -> Any:
    """A value read from the document as JSON, or ABSENT; iterative, so depth costs no stack.

    `depth` is the JSON depth of `raw` in the environment (docs/model.md): containers deeper
    than MAX_DEPTH read as ABSENT.
    """
    value, children = _start(raw, txn, depth)
    if children is None:
        return value
    stack = [(children, value, depth)]
    while stack:
        items, target, level = stack[-1]
        for key, item in items:
            v, sub = _start(item, txn, level + 1)
            if v is ABSENT:
                continue
            if key is None:
                target.append(v)
            else:
                target[key] = v
            if sub is not None:
                stack.append((sub, v, level + 1))
                break
        else:
            stack.pop()
    return value


def plain_items(arr: Array) -> list[Any]:
    """Each item of an array as JSON, None for what reads as absent: one per index, so the
    result lines up with the array's own indexes (unlike `plain`, which drops absent items)."""
    with arr.doc.transaction() as t:
        raw, txn = arr.integrated, t._txn
        items = [plain(raw.get(txn, i), txn, 1) for i in range(raw.len(txn))]
    return [None if v is ABSENT else v for v in items]


def read(doc: Doc) -> dict[str, Any]:
    """The environment as JSON, assembled from the document's root types; total.

    Whatever any client wrote, this returns plain JSON (dicts, lists, str, int, finite float,
    bool, None), nested at most MAX_DEPTH deep; what is not JSON reads as absent (docs/model.md).
    Entity lists and `rootChildren` are always present: `repair` then makes the rest valid.
    """
    env_map = root_map(doc, ENV_ROOT)
    lists = {
        key: (root_map(doc, key), root_array(doc, key + ORDER_SUFFIX)) for key in ROOT_ENTITY_LISTS
    }
    refs = root_array(doc, ROOT_REF_LIST)
    with doc.transaction() as t:
        txn = t._txn
        env = plain(env_map.integrated, txn, 0)
        for key, kind in ROOT_ENTITY_LISTS.items():
            items_map, order_array = lists[key]
            items = plain(items_map.integrated, txn, 1)
            order = plain(order_array.integrated, txn, 1)
            env[key] = assemble(items, order, KINDS[kind])
        env[ROOT_REF_LIST] = plain(refs.integrated, txn, 1)
    return env


def assemble(items: Any, order: Any, kind: Kind) -> list[dict[str, Any]]:
    """An entity list from its uuid-keyed map and its order array.

    The order array may hold duplicates (concurrent moves) or uuids of deleted entities; the
    first occurrence wins, and entities missing from it follow, sorted by uuid, so every replica
    assembles the same list.
    """
    if isinstance(items, list):  # a client wrote a plain list: keep what has a uuid, once
        out, seen = [], set()
        for e in items:
            uid = e.get("uuid") if isinstance(e, dict) else None
            if isinstance(uid, str) and uid and uid not in seen:
                seen.add(uid)
                out.append(_assemble_entity(e, kind))
        return out  # (repairing the rest would give it random uuids: replicas would differ)
    if not isinstance(items, dict):
        return []
    valid = {k for k, v in items.items() if k and isinstance(v, dict)}  # "" is no uuid
    ids: list[str] = []
    seen: set[str] = set()
    for uid in order if isinstance(order, list) else []:
        if isinstance(uid, str) and uid in valid and uid not in seen:
            seen.add(uid)
            ids.append(uid)
    ids.extend(sorted(valid - seen))
    out = []
    for uid in ids:
        entity = _assemble_entity(items[uid], kind)
        entity["uuid"] = uid
        out.append(entity)
    return out


def _assemble_entity(entity: dict[str, Any], kind: Kind) -> dict[str, Any]:
    for key, sub in kind.entity_lists.items():
        order = entity.pop(key + ORDER_SUFFIX, [])
        if isinstance(entity.get(key), dict | list):  # anything else is left to `repair`
            entity[key] = assemble(entity[key], order, KINDS[sub])
    return entity
