"""The public face of the model: environments in, environments out, and whole-file writes."""

from __future__ import annotations

import weakref
from typing import Any

from pycrdt import Doc

from .edits import sync_entities, sync_fields, sync_plain_array, unchanged
from .layout import (
    ENV_ROOT,
    META_ROOT,
    NotJson,
    prepared_along,
    prepared_value,
    read,
    root_array,
    root_map,
)
from .repair import (
    ModelError,
    check_environment,
    check_json,
    conform,
    conform_along,
    is_newer,
    repair,
)
from .schema import KINDS, MODEL_VERSION, ORDER_SUFFIX, ROOT_ENTITY_LISTS, ROOT_REF_LIST
from .strays import has_strays, remove_strays

_TOP_LISTS = (*ROOT_ENTITY_LISTS, ROOT_REF_LIST)

_UNFAITHFUL: weakref.WeakKeyDictionary[Doc, bool] = weakref.WeakKeyDictionary()
"""Documents whose last export changed an entity's identity or a reference (see
`apply_environment`)."""


def prepare(
    env: Any, env_id: str | None = None, base: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Check and repair a JSON environment before it touches a document; returns a copy.

    Refuses (ModelError, naming the field's JSON Pointer) what no environment can hold or a
    known field of the wrong type; fills Mockoon's defaults for missing fields; notes every
    other repair. The result is exactly what the document will export (`repair` leaves it as
    it is), so callers may cache it as the export.

    `base`: a prepared environment of `env_id` that `env` was made from by changing copies of
    some of its containers (a JSON Patch on the cached export). The containers `env` still
    shares with it are prepared already: they are shared by the result too, and only the rest
    is checked, so a small patch of a big environment costs little. The result is the same
    as without it (whatever `base` is, if it was prepared and never changed since).
    """
    check_environment(env)
    if base is not None and env_id is not None and type(env) is dict:
        fast = _prepare_along(env, env_id, base)
        if fast is not None:
            return fast
    try:
        env = prepared_value(env)  # a copy, with numbers and strings as they will export
    except (NotJson, AttributeError):
        check_json(env)  # raises the ModelError that says where
        raise
    notes: list[str] = []
    if env_id is not None and env.get("uuid") != env_id:
        if "uuid" in env:
            notes.append(f"uuid {env['uuid']!r} is not this environment's id; kept {env_id}")
        env["uuid"] = env_id
    conform(env, strict=not is_newer(env), notes=notes)
    return env, notes


def _prepare_along(
    env: dict[str, Any], env_id: str, base: dict[str, Any]
) -> tuple[dict[str, Any], list[str]] | None:
    """`prepare` on what `env` does not share with `base`; None when `prepare` must do it all
    (also for anything it refuses, so that its error is the one of the whole walk)."""
    if env.get("uuid") != env_id:
        return None  # noted by the whole walk
    try:
        out = prepared_along(env, base)
        if out is base:
            out = dict(base)
        notes: list[str] = []
        if conform_along(out, base, strict=not is_newer(out), notes=notes):
            return out, notes
    except (NotJson, AttributeError, ModelError, RecursionError):
        pass
    return None


def apply_environment(
    doc: Doc,
    env: dict[str, Any],
    origin: Any = None,
    old: dict[str, Any] | None = None,
    model: int | None = None,
) -> None:
    """Bring `doc` to `env` (a result of `prepare`) with the smallest change, in one transaction.

    `old`, if given, must be what `export_environment(doc)` returns now: the parts of `env` equal
    to it are skipped without reading the document, so a small edit of a big environment costs
    little. If that export had to give entities new uuids or mend references, `old` is not a
    faithful picture of the document (a skipped part could read differently once the rest has
    changed), and the whole document is synced instead, once: afterwards it mirrors `env`.

    A new document gets `meta.model` = `model` (default MODEL_VERSION: a daemon run at a lower
    model passes its own); an existing one keeps its version, which only a migration changes
    (model/migrations.py), and one that has none gets 1, what it reads as.
    """
    if _UNFAITHFUL.pop(doc, False):
        old = None
    old = old or {}
    lists: dict[str, tuple[list[Any], list[Any] | None]] = {}  # the entity lists to sync
    for key in ROOT_ENTITY_LISTS:
        value = env.get(key, [])
        value = value if isinstance(value, list) else []
        previous = old.get(key)
        if not (isinstance(previous, list) and unchanged(previous, value)):
            lists[key] = (value, previous if isinstance(previous, list) else None)
    refs = env.get(ROOT_REF_LIST, [])
    refs = refs if isinstance(refs, list) else []
    sync_refs = not unchanged(old.get(ROOT_REF_LIST), refs)
    # Text in the arrays is not part of any environment, and hangs yrs on reading them: look in
    # the arrays this write reads (what a merge brings is checked by the registry as it comes,
    # and this write adds none), so that a small edit does not read every array of a big one.
    if old:
        read = {k + ORDER_SUFFIX for k in lists}
        remove_strays(doc, read | {ROOT_REF_LIST} if sync_refs else read)
    else:
        remove_strays(doc)
    new = not len(root_map(doc, ENV_ROOT))
    with doc.transaction(origin=origin):
        top = {k: v for k, v in env.items() if k not in _TOP_LISTS}
        old_top = {k: v for k, v in old.items() if k not in _TOP_LISTS} if old else None
        sync_fields(root_map(doc, ENV_ROOT), top, KINDS["environment"], old_top)
        for key, (value, previous) in lists.items():
            sync_entities(
                root_map(doc, key),
                root_array(doc, key + ORDER_SUFFIX),
                value,
                KINDS[ROOT_ENTITY_LISTS[key]],
                previous,
            )
        if sync_refs:
            sync_plain_array(root_array(doc, ROOT_REF_LIST), refs)
        meta = root_map(doc, META_ROOT)
        if "model" not in meta:  # an existing one without it was written by a model-1 client
            meta["model"] = (MODEL_VERSION if model is None else model) if new else 1
        if "absent" in meta:  # no longer in the layout (migration 1 -> 2); a client wrote it
            del meta["absent"]


def import_environment(
    env: Any, env_id: str | None = None, origin: Any = None
) -> tuple[Doc, dict[str, Any], list[str]]:
    """A new document holding `env` (repaired); returns it, the stored JSON and the repairs."""
    prepared, notes = prepare(env, env_id)
    doc = Doc()
    apply_environment(doc, prepared, origin)
    return doc, prepared, notes


def export_environment(doc: Doc, env_id: str | None = None) -> dict[str, Any]:
    """The document as a valid Mockoon environment, whatever merges or clients put in it.

    Total and deterministic: every replica holding the same updates exports the same JSON,
    which passes Mockoon's strict schema (docs/model.md, "Reading"). Without `env_id`, the
    environment's uuid is what the document holds, if it holds a string.
    """
    source = doc
    if has_strays(doc):  # read a copy without them: reading them hangs yrs (strays.py)
        source = Doc()
        source.apply_update(doc.get_update())
        remove_strays(source)
    env = read(source)
    if repair(env, env_id) or source is not doc:
        _UNFAITHFUL[doc] = True
    else:
        _UNFAITHFUL.pop(doc, None)
    return env


__all__ = [
    "apply_environment",
    "export_environment",
    "import_environment",
    "is_newer",
    "prepare",
]
