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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pycrdt import Doc, Map

from .schema import MODEL_VERSION
from .yupdate import GC, Item, read_items

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


@dataclass(slots=True)
class _Entry:
    id: _ID
    origin: _ID | None
    right: _ID | None
    model_key: bool  # given as the parent `meta` and key `model`
    value: object


def _entries(update: bytes | Sequence[Item]) -> list[_Entry]:
    """The update's one-unit items (map entries among them), with their numbers; `update` may
    be its items already read (`read_items`), so that a caller decodes each update once."""
    items = read_items(update) if isinstance(update, bytes | bytearray | memoryview) else update
    return [
        _Entry(
            (it.client, it.clock),
            it.origin,
            it.right_origin,
            it.parent == META_ROOT and it.sub == MODEL_KEY,
            it.value,
        )
        for it in items
        if it.length == 1 and it.content != GC  # longer ones are array content
    ]


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
    update: bytes | Sequence[Item], known: set[_ID] | Callable[[], set[_ID]]
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
