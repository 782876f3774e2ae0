"""Whole-environment writes turned into the smallest CRDT change.

Editors save whole files; applying a file by replacing the document would turn every save into a
conflict with whatever a teammate did meanwhile. Here the document is brought to the new JSON
with per-entity, per-property, per-item and per-character edits, so that only what the save
actually changed competes with concurrent edits.
"""

from __future__ import annotations

import json
from difflib import SequenceMatcher
from itertools import compress
from operator import is_not
from typing import Any

from pycrdt import Array, Map, Text

from .layout import (
    GENERIC,
    build_fields,
    build_value,
    js_value,
    normalize,
    plain_items,
    storable,
)
from .schema import KINDS, ORDER_SUFFIX, Kind

_SHARED = (Map, Array, Text)
_MISSING = object()


def same_scalar(current: Any, value: Any) -> bool:
    """Equal as JSON values; True == 1 in Python, but not in JSON."""
    if isinstance(current, _SHARED):
        return False
    if isinstance(current, bool) or isinstance(value, bool):
        return type(current) is type(value) and current == value
    if isinstance(current, int | float) and isinstance(value, int | float):
        return current == value
    return type(current) is type(value) and current == value


def unchanged(old: Any, new: Any) -> bool:
    """`old` (the JSON the document exported before) already equals `new` here.

    Comparing plain JSON is far cheaper than reading pycrdt objects, so equal subtrees are
    skipped without touching the document. The type check keeps `true` and `1` apart at the
    top of the value.
    """
    return type(old) is type(new) and old == new


def sync_fields(
    ymap: Map, target: dict[str, Any], kind: Kind, old: dict[str, Any] | None = None
) -> None:
    """Bring a Y.Map holding one JSON object of `kind` to `target`.

    `old`, when given, is the JSON this map exported before; subtrees equal in both are skipped.
    """
    if old is not None and not isinstance(old, dict):
        old = None
    for key in list(ymap.keys()):
        base = key[: -len(ORDER_SUFFIX)] if key.endswith(ORDER_SUFFIX) else None
        keep_order = base is not None and base in kind.entity_lists and base in target
        if key not in target and not keep_order:
            del ymap[key]
    for key, value in target.items():
        previous = _MISSING
        if old is not None and key in old:
            previous = old[key]
            if unchanged(previous, value):
                continue
        if previous is _MISSING:
            previous = None
        present = key in ymap
        current = ymap[key] if present else None
        if key in kind.texts and isinstance(value, str):
            if isinstance(current, Text):
                sync_text(current, value)
            else:
                ymap[key] = Text(value)
        elif key in kind.entity_lists and isinstance(value, list):
            sub = KINDS[kind.entity_lists[key]]
            order_key = key + ORDER_SUFFIX
            if not isinstance(current, Map):
                ymap[key] = Map()
                current = ymap[key]
            order = ymap[order_key] if order_key in ymap else None
            if not isinstance(order, Array):
                ymap[order_key] = Array()
                order = ymap[order_key]
            sync_entities(current, order, value, sub, previous)
        elif key in kind.object_lists and isinstance(value, list):
            sub = KINDS[kind.object_lists[key]]
            if isinstance(current, Array):
                sync_array(current, value, sub)
            else:
                ymap[key] = Array([build_value(v, sub) for v in value])
        elif key in kind.ref_lists and isinstance(value, list):
            if isinstance(current, Array):
                sync_plain_array(current, value)
            else:
                ymap[key] = Array([js_value(v) for v in value])
        elif isinstance(value, dict):
            if isinstance(current, Map):
                sync_fields(current, value, GENERIC, previous)
            else:
                ymap[key] = build_value(value)
        elif isinstance(value, list):
            if isinstance(current, Array):
                sync_array(current, value, GENERIC)
            else:
                ymap[key] = build_value(value)
        elif not present or not same_scalar(current, value):
            ymap[key] = storable(value)


def sync_entities(
    items: Map,
    order: Array,
    target: list[dict[str, Any]],
    kind: Kind,
    old: list[dict[str, Any]] | None = None,
) -> None:
    """Entities are edited in place and only their uuids move, so a move never loses an edit.

    `old` guides the write only if the map's keys are the uuids it exported: a read that dropped
    an entity or gave one a new uuid (docs/model.md, "Reading") is healed by a full sync.
    """
    if (
        isinstance(old, list)
        and len(old) == len(target) == len(items)
        and _sync_changed(items, target, kind, old)
    ):
        return
    ids = [e["uuid"] for e in target]
    before: dict[str, Any] = {}
    if isinstance(old, list):
        before = {e.get("uuid"): e for e in old if isinstance(e, dict)}
        if before.keys() != set(items.keys()):
            old, before = None, {}
    wanted = set(ids)
    if before.keys() != wanted or not before:
        for uid in list(items.keys()):
            if uid not in wanted:
                del items[uid]
    for entity in target:
        uid = entity["uuid"]
        previous = before.get(uid)
        if previous is not None and unchanged(previous, entity):
            continue
        current = items[uid] if uid in items else None
        if isinstance(current, Map):
            sync_fields(current, entity, kind, previous)
        else:
            items[uid] = Map(build_fields(entity, kind))
    if [e.get("uuid") for e in old or ()] != ids or not isinstance(old, list):
        sync_plain_array(order, ids)


def _sync_changed(items: Map, target: list[dict[str, Any]], kind: Kind, old: list[Any]) -> bool:
    """`sync_entities` when `target` holds the entities of `old` in the same order, and the map
    as many as `old` (then its keys are the uuids `old` was exported from): only the entities
    not shared with `old` are looked at, found at C speed, so editing one route of hundreds
    costs one route. False (nothing done) if an entity changed its uuid or place."""
    places = list(compress(range(len(target)), map(is_not, target, old)))
    for i in places:
        previous = old[i]
        if not isinstance(previous, dict) or target[i]["uuid"] != previous.get("uuid"):
            return False
    for i in places:
        entity, previous = target[i], old[i]
        if unchanged(previous, entity):
            continue
        uid = entity["uuid"]
        current = items[uid] if uid in items else None
        if isinstance(current, Map):
            sync_fields(current, entity, kind, previous)
        else:
            items[uid] = Map(build_fields(entity, kind))
    return True


def _key(value: Any) -> str:
    # strings too: "1" and 1, '{"a":1}' and {"a": 1} are different items
    return json.dumps(normalize(value), sort_keys=True, separators=(",", ":"))


def sync_plain_array(arr: Array, target: list[Any]) -> None:
    """Items compared whole: deletes and inserts only (references, uuid orders)."""
    current = [_key(v) for v in plain_items(arr)]
    wanted = [_key(v) for v in target]
    if current == wanted:
        return
    ops = SequenceMatcher(None, current, wanted, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in reversed(ops):
        if tag in ("replace", "delete"):
            del arr[i1:i2]
        if tag in ("replace", "insert"):
            for offset, value in enumerate(target[j1:j2]):
                arr.insert(i1 + offset, js_value(value))


def sync_array(arr: Array, target: list[Any], kind: Kind) -> None:
    """Lists without ids (headers, rules): unchanged items kept, changed ones edited in place."""
    items = list(arr)
    current = [_key(v) for v in plain_items(arr)]
    wanted = [_key(v) for v in target]
    if current == wanted:
        return
    ops = SequenceMatcher(None, current, wanted, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in reversed(ops):
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1)
        for p in range(paired):
            existing, value = items[i1 + p], target[j1 + p]
            if isinstance(existing, Map) and isinstance(value, dict):
                sync_fields(existing, value, kind)
            elif isinstance(existing, Array) and isinstance(value, list):
                sync_array(existing, value, GENERIC)
            else:
                del arr[i1 + p]
                arr.insert(i1 + p, build_value(value, kind))
        if i2 - i1 > paired:
            del arr[i1 + paired : i2]
        for offset, value in enumerate(target[j1 + paired : j2]):
            arr.insert(i1 + paired + offset, build_value(value, kind))


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def sync_text(text: Text, new: str) -> None:
    """Per-character edits; pycrdt indexes Text by UTF-8 bytes."""
    old = str(text)
    if old == new:
        return
    for start, end, replacement in reversed(list(_text_hunks(old, new))):
        b_start = _utf8_len(old[:start])
        b_end = b_start + _utf8_len(old[start:end])
        if b_end > b_start:
            del text[b_start:b_end]
        if replacement:
            text.insert(b_start, replacement)


_CHAR_DIFF_LIMIT = 250_000


def _text_hunks(
    old: str, new: str, base: int = 0, by_lines: bool = True
) -> list[tuple[int, int, str]]:
    """(start, end, replacement) hunks in `old` coordinates, in order.

    A block the line diff replaces shares no line, so it is refined by characters only
    (`by_lines=False`): splitting it into lines again could give back the same block, and recurse
    on it forever. Too large for that and for Myers, a block is one replace hunk.
    """
    p = 0
    limit = min(len(old), len(new))
    while p < limit and old[p] == new[p]:
        p += 1
    s = 0
    while s < limit - p and old[-1 - s] == new[-1 - s]:
        s += 1
    a, b = old[p : len(old) - s], new[p : len(new) - s]
    start = base + p
    if not a or not b:
        return [(start, start + len(a), b)]
    lines = len(a) * len(b) > _CHAR_DIFF_LIMIT
    if not lines:
        units_a, units_b = list(a), list(b)
    else:
        # a few edits in a large text (a minified JSON body is one long line): exact and cheap
        few = _myers_hunks(a, b, start)
        if few is not None:
            return few
        if not by_lines:
            return [(start, start + len(a), b)]
        units_a, units_b = a.splitlines(keepends=True), b.splitlines(keepends=True)
        if len(units_a) * len(units_b) > _CHAR_DIFF_LIMIT or (
            len(units_a) < 2 and len(units_b) < 2
        ):
            return [(start, start + len(a), b)]
    hunks: list[tuple[int, int, str]] = []
    pos_a = [0]
    for u in units_a:
        pos_a.append(pos_a[-1] + len(u))
    pos_b = [0]
    for u in units_b:
        pos_b.append(pos_b[-1] + len(u))
    matcher = SequenceMatcher(None, units_a, units_b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        sa, ea, sb, eb = pos_a[i1], pos_a[i2], pos_b[j1], pos_b[j2]
        if lines and tag == "replace":  # line units: refine inside the block
            hunks.extend(_text_hunks(a[sa:ea], b[sb:eb], start + sa, by_lines=False))
        else:
            hunks.append((start + sa, start + ea, b[sb:eb]))
    return hunks


_MYERS_MAX_EDITS = 200


def _common_length(a: str, b: str, x: int, y: int) -> int:
    """Length of the common prefix of a[x:] and b[y:], compared in growing slices."""
    n, step = 0, 32
    while True:
        ca, cb = a[x + n : x + n + step], b[y + n : y + n + step]
        if ca == cb:
            n += len(ca)
            if len(ca) < step:
                return n
            step *= 2
            continue
        for i in range(min(len(ca), len(cb))):
            if ca[i] != cb[i]:
                return n + i
        return n + min(len(ca), len(cb))


def _myers_hunks(a: str, b: str, base: int) -> list[tuple[int, int, str]] | None:
    """Character hunks of a shortest edit script (Myers), or None beyond _MYERS_MAX_EDITS edits.

    O((len(a) + len(b)) * edits): for large texts with few changes, where SequenceMatcher is
    quadratic.
    """
    n, m = len(a), len(b)
    size = 2 * _MYERS_MAX_EDITS + 3
    v = [0] * size
    trace: list[list[int]] = []
    for d in range(_MYERS_MAX_EDITS + 1):
        trace.append(v.copy())
        for k in range(-d, d + 1, 2):
            if k == -d or (k != d and v[k - 1] < v[k + 1]):
                x = v[k + 1]
            else:
                x = v[k - 1] + 1
            y = x - k
            if x < n and y < m:
                common = _common_length(a, b, x, y)
                x, y = x + common, y + common
            v[k] = x
            if x >= n and y >= m:
                return _myers_backtrack(trace, a, b, base)
    return None


def _myers_backtrack(
    trace: list[list[int]], a: str, b: str, base: int
) -> list[tuple[int, int, str]]:
    x, y = len(a), len(b)
    moves: list[tuple[int, int, int, int]] = []  # one insert or delete: (x0, y0) -> (x1, y1)
    for d in range(len(trace) - 1, 0, -1):
        v = trace[d]
        k = x - y
        prev_k = k + 1 if k == -d or (k != d and v[k - 1] < v[k + 1]) else k - 1
        prev_x = v[prev_k]
        prev_y = prev_x - prev_k
        mid_x, mid_y = (prev_x, prev_y + 1) if prev_k == k + 1 else (prev_x + 1, prev_y)
        moves.append((prev_x, prev_y, mid_x, mid_y))
        x, y = prev_x, prev_y
    hunks: list[list[int]] = []  # [x0, x1, y0, y1], merged while no common run separates them
    for x0, y0, x1, y1 in reversed(moves):
        if hunks and hunks[-1][1] == x0 and hunks[-1][3] == y0:
            hunks[-1][1], hunks[-1][3] = x1, y1
        else:
            hunks.append([x0, x1, y0, y1])
    return [(base + x0, base + x1, b[y0:y1]) for x0, x1, y0, y1 in hunks]
