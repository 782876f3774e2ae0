"""Migrations of the environment document's Yjs layout, one model version at a time.

Every environment document says which layout it follows in `meta.model` (docs/model.md). When
the layout changes, `MODEL_VERSION` goes up and a migration from the previous version joins
`MIGRATIONS`: a function over a pycrdt document that turns a version-N layout into N+1 in the
caller's transaction. `migrate` runs the ones a document needs in one transaction, so the whole
migration is one update that every replica converges to.

Replicas that were apart may migrate the same document each on its own; their updates then
merge. So a migration must be idempotent under a CRDT merge: two concurrent applications must
read as one. Deleting keys and writing plain values equal on every replica are; creating shared
types (two concurrent Y.Maps under one key: one wins, with whatever was written into it) is not,
and needs a design that derives the new items from the document alone.

`update_models` reads, from the bytes of an update, the model versions it writes into
`meta.model`, so a device can refuse a migrated document before merging it (docs/spaces.md).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pycrdt import Doc, Map

from .lib0 import BadVarUint, read_var_uint
from .schema import MODEL_VERSION

__all__ = [
    "ENV_OVERRIDE",
    "MIGRATIONS",
    "Migration",
    "ModelOverrideError",
    "daemon_version",
    "doc_version",
    "migrate",
    "model_item_ids",
    "update_models",
]

META_ROOT = "meta"
MODEL_KEY = "model"
FIRST_VERSION = 1
"""What a document without a usable `meta.model` is read as: the first layout (a client that
builds an environment from docs/model.md may not write it)."""

ENV_OVERRIDE = "PEERDAEMON_MODEL_VERSION"
"""Lowers the model a daemon runs at, for tests of two daemon versions side by side."""


class ModelOverrideError(RuntimeError):
    """ENV_OVERRIDE names no model this code has: the daemon does not start (one line)."""


@dataclass(frozen=True)
class Migration:
    """From `version` to `version + 1`, inside the caller's transaction."""

    version: int
    summary: str
    apply: Callable[[Doc], None]


def _drop_absent(doc: Doc) -> None:
    """1 -> 2: `meta.absent` listed the entity lists a file lacked; since every export has them
    all (Mockoon's strict schema requires them) it is dead weight that readers must ignore."""
    meta = doc.get(META_ROOT, type=Map)
    if "absent" in meta:
        del meta["absent"]


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "drop the legacy meta.absent key", _drop_absent),)
"""In order; `MIGRATIONS[i]` goes from version i + 1 to i + 2, the last one to MODEL_VERSION."""

assert [m.version for m in MIGRATIONS] == list(range(FIRST_VERSION, MODEL_VERSION))


def daemon_version(environ: Mapping[str, str] = os.environ) -> int:
    """The model this daemon runs at: MODEL_VERSION, or lower under ENV_OVERRIDE (tests).

    Raises ModelOverrideError on an override that is no version this code has: a daemon cannot
    be told to know migrations it does not have."""
    raw = environ.get(ENV_OVERRIDE, "").strip()
    if not raw:
        return MODEL_VERSION
    try:
        version = int(raw)
    except ValueError:
        raise ModelOverrideError(f"{ENV_OVERRIDE}={raw!r} is not a number") from None
    if not FIRST_VERSION <= version <= MODEL_VERSION:
        raise ModelOverrideError(
            f"{ENV_OVERRIDE}={version}: this peerdaemon has models "
            f"{FIRST_VERSION} to {MODEL_VERSION}"
        )
    return version


def doc_version(doc: Doc) -> int:
    """The document's `meta.model`; FIRST_VERSION when it holds no usable version."""
    return as_version(doc.get(META_ROOT, type=Map).get(MODEL_KEY))


def as_version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return FIRST_VERSION
    if not math.isfinite(value) or value != int(value) or value < FIRST_VERSION:
        return FIRST_VERSION
    return int(value)


def migrate(
    doc: Doc,
    target: int = MODEL_VERSION,
    origin: object = None,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> list[Migration]:
    """Bring the document up to `target` in one transaction; -> the migrations applied (none
    if it is at `target` or newer: a document is never migrated down). `migrations`: the chain
    (tests pass longer ones)."""
    newest = migrations[-1].version + 1 if migrations else FIRST_VERSION
    if target > newest:
        raise ValueError(f"no migrations to model {target} (this code knows {newest})")
    version = doc_version(doc)
    steps = [m for m in migrations if version <= m.version < target]
    if not steps:
        return []
    with doc.transaction(origin=origin):
        for step in steps:
            step.apply(doc)
        doc.get(META_ROOT, type=Map)[MODEL_KEY] = target
    return steps


# ---------------------------------------------------------------------------------------------
# meta.model in update bytes (Yjs update format v1)

_ID = tuple[int, int]
_GC, _DELETED, _JSON, _BINARY, _STRING, _EMBED, _FORMAT, _TYPE, _ANY, _DOC, _SKIP = range(11)
_NO_VALUE = object()


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("unexpected end of update")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self) -> int:
        try:
            value, self.pos = read_var_uint(self.data, self.pos)
        except BadVarUint as exc:
            raise ValueError(str(exc)) from None
        return value

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("unexpected end of update")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def string(self) -> str:
        return self.raw(self.uint()).decode("utf-8", "surrogatepass")

    def signed(self) -> int:
        b = self.byte()
        negative, value, shift = b & 0x40, b & 0x3F, 6
        while b & 0x80:
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
        return -value if negative else value

    def any_value(self) -> object:
        """One lib0 `Any`: a number is returned, anything else read past (_NO_VALUE)."""
        tag = self.byte()
        if tag == 125:
            return self.signed()
        if tag == 124:
            return struct.unpack(">f", self.raw(4))[0]
        if tag == 123:
            return struct.unpack(">d", self.raw(8))[0]
        if tag == 122:
            return struct.unpack(">q", self.raw(8))[0]
        todo = {118: 0, 117: 0}.get(tag)
        if todo is None:
            if tag in (119, 116):
                self.raw(self.uint())
            elif tag not in (127, 126, 121, 120):
                raise ValueError(f"unknown value tag {tag}")
            return _NO_VALUE
        pending = [tag]
        while pending:  # iterative: nesting costs no stack
            kind = pending.pop()
            if kind == 0:  # a map's key
                self.raw(self.uint())
                continue
            if kind in (118, 117):
                n = self.uint()
                pending += ([1, 0] if kind == 118 else [1]) * n
                continue
            inner = self.byte()  # kind 1: a value
            if inner in (118, 117):
                pending.append(inner)
            elif inner == 125:
                self.signed()
            elif inner == 124:
                self.raw(4)
            elif inner in (123, 122):
                self.raw(8)
            elif inner in (119, 116):
                self.raw(self.uint())
            elif inner not in (127, 126, 121, 120):
                raise ValueError(f"unknown value tag {inner}")
        return _NO_VALUE


@dataclass(slots=True)
class _Entry:
    id: _ID
    origin: _ID | None
    right: _ID | None
    model_key: bool  # given as the parent `meta` and key `model`
    value: object


def _entries(update: bytes) -> list[_Entry]:
    r = _Bytes(update)
    out: list[_Entry] = []
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        for _ in range(count):
            info = r.byte()
            ref = info & 0x1F
            if ref in (_GC, _SKIP):
                clock += r.uint()
                continue
            origin = (r.uint(), r.uint()) if info & 0x80 else None
            right = (r.uint(), r.uint()) if info & 0x40 else None
            parent: str | None = None
            sub: str | None = None
            if not info & 0xC0:
                parent = r.string() if r.uint() == 1 else str((r.uint(), r.uint()))
                if info & 0x20:
                    sub = r.string()
            value: object = _NO_VALUE
            if ref == _DELETED:
                length = r.uint()
            elif ref == _JSON:
                length = r.uint()
                for _ in range(length):
                    r.string()
            elif ref == _BINARY:
                r.raw(r.uint())
                length = 1
            elif ref == _STRING:
                length = len(r.string().encode("utf-16-le", "surrogatepass")) // 2
            elif ref == _EMBED:
                r.string()
                length = 1
            elif ref == _FORMAT:
                r.string()
                r.string()
                length = 1
            elif ref == _TYPE:
                if r.uint() in (3, 5):  # an XmlElement's or XmlHook's name
                    r.string()
                length = 1
            elif ref == _ANY:
                length = r.uint()
                values = [r.any_value() for _ in range(length)]
                value = values[0] if length == 1 else _NO_VALUE
            elif ref == _DOC:
                r.string()
                r.any_value()
                length = 1
            else:
                raise ValueError(f"unknown content ref {ref}")
            if length == 1:  # a map entry is one item; longer ones are array content
                keyed = parent == META_ROOT and sub == MODEL_KEY
                out.append(_Entry((client, clock), origin, right, keyed, value))
            clock += length
    return out


def _model_entries(entries: list[_Entry], known: Iterable[_ID]) -> list[_Entry]:
    """The entries that are values of `meta.model`: given so, or placed next to one (a map
    entry's origins are the entries of the same key it replaced), to a fixpoint."""
    ids = set(known)
    found: list[_Entry] = []
    rest = entries
    while True:
        more = [
            e
            for e in rest
            if e.model_key or e.origin in ids or (e.right is not None and e.right in ids)
        ]
        if not more:
            return found
        found += more
        ids.update(e.id for e in more)
        taken = {id(e) for e in more}
        rest = [e for e in rest if id(e) not in taken]


def model_item_ids(state: bytes) -> set[_ID]:
    """The ids of every `meta.model` entry in a document's whole state (`doc.get_update()`):
    what `update_models` needs to recognise a replacement of one of them. Raises ValueError."""
    return {e.id for e in _model_entries(_entries(state), ())}


def update_models(
    update: bytes, known: set[_ID] | Callable[[], set[_ID]]
) -> tuple[list[int], set[_ID]]:
    """The versions an update writes into `meta.model` (of a document whose model entries are
    `known`), and the ids of those entries. Raises ValueError on bytes it cannot decode.

    `known` may be a function, called only when the update holds a number that replaces some
    entry (the document's entries cost a decode of its whole state): most updates hold none."""
    entries = _entries(update)
    if callable(known):
        numbers = [e for e in entries if isinstance(e.value, int | float) and not e.model_key]
        known = known() if numbers else set()
    found = _model_entries(entries, known)
    versions = [
        as_version(e.value)
        for e in found
        if isinstance(e.value, int | float) and e.value == e.value
    ]
    return versions, {e.id for e in found}
