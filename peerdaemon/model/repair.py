"""Environment JSON brought to Mockoon's strict schema, as Mockoon's own loader does it.

Two modes, one walk (`conform`):

- on a local write (`prepare`: import, put, patch, linked files), a known field of the wrong JSON
  type is refused with a `ModelError` naming its JSON Pointer, so nothing a user wrote is silently
  replaced; a missing field gets Mockoon's default; a value of the right type that the schema
  does not allow (an unknown enum value, a port beyond 65535, a uuid that is no GUID) gets
  Mockoon's default too, with a note, as Mockoon's loader would do on opening the file. A file
  from a newer Mockoon (lastMigration above 33) may have changed a field's type: it is not
  refused but repaired like a merge, with a note per repair;
- on every export (`repair`, after `layout.read`), whatever merges or Yjs clients wrote is
  repaired without a word: wrong types get Mockoon's defaults as well.

Both are deterministic (replacement uuids are derived from what they replace), so every replica
exports the same JSON, and `prepare`'s output is a fixed point of `repair`: the registry caches
what `prepare` returns as the export. Unknown fields are kept as they are.
"""

from __future__ import annotations

import math
import re
from itertools import compress
from operator import is_not
from typing import Any

from .schema import (
    FIELDS,
    ITEM_DEFAULTS,
    LAST_MIGRATION,
    MAX_DEPTH,
    ROOT_REF_LIST,
    TLS_DEFAULT,
    Spec,
    derived_id,
    derived_uuid,
    is_guid,
)


class ModelError(ValueError):
    """Input the model refuses; `code` is the API error code."""

    code = "bad-request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAnEnvironment(ModelError):
    code = "not-an-environment"


def check_environment(obj: Any) -> None:
    """Refuse what is not a Mockoon environment at all, before anything is stored."""
    if not isinstance(obj, dict):
        raise NotAnEnvironment(f"an environment is a JSON object, not {_json_type(obj)}")
    lm = obj.get("lastMigration")
    if lm is not None and (isinstance(lm, bool) or not isinstance(lm, int | float)):
        raise NotAnEnvironment("/lastMigration must be a number")
    if not isinstance(obj.get("uuid"), str) and lm is None:
        raise NotAnEnvironment("not a Mockoon environment: it has neither uuid nor lastMigration")
    routes = obj.get("routes")
    if routes is not None and not isinstance(routes, list):
        raise NotAnEnvironment("/routes must be a list")
    if "uuid" in obj and (not isinstance(obj["uuid"], str) or not obj["uuid"]):
        raise NotAnEnvironment("/uuid must be a non-empty string")


def is_newer(env: dict[str, Any]) -> bool:
    """A file from a Mockoon newer than this model: flagged, and still made schema-valid."""
    lm = env.get("lastMigration")
    return (
        isinstance(lm, int | float)
        and not isinstance(lm, bool)
        and math.isfinite(lm)
        and lm > LAST_MIGRATION
    )


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return "no JSON value"


def repair(env: dict[str, Any], env_id: str | None = None) -> bool:
    """Make `env` (read from a document) valid by the strict schema, in place, silently.

    Returns True if an entity was dropped or given a new uuid, or a reference was changed:
    then the JSON no longer mirrors the document's keys and references one to one.
    """
    return _Conform(False, None).run(env, env_id)


def conform(
    env: dict[str, Any], strict: bool, notes: list[str] | None, env_id: str | None = None
) -> None:
    """Bring `env` to Mockoon's strict schema in place (see the module docstring for the modes).

    `strict`: raise `ModelError` for a field of the wrong type instead of repairing it. Every
    repair is noted in `notes` (if given).
    """
    _Conform(strict, notes).run(env, env_id)


def conform_along(
    env: dict[str, Any], base: dict[str, Any], strict: bool, notes: list[str] | None
) -> bool:
    """`conform(env, strict, notes)` for an environment from `layout.prepared_along(..., base)`,
    where `base` is a conformed environment of the same uuid: the entities `env` shares with it
    are conformed already, so only the others are checked, and the references and the uuids of
    the whole only when a change can reach them. False when it cannot tell (a uuid to repair, a
    different lastMigration...): `env` may then be half done; the caller conforms a fresh copy.
    """
    return _Conform(strict, notes).run_along(env, base)


_MISSING = object()
_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?\s*", re.I | re.A)
_MAX_SAFE = 2**53 - 1
_ENTITY_LISTS = ("routes", "folders", "callbacks", "data")
"""Also the order in which entities claim their uuids: the first claim keeps it."""
_KIND = {"routes": "route", "folders": "folder", "callbacks": "callback", "data": "data"}


def _pointer(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}/{key}"
    return f"{parent}/{key.replace('~', '~0').replace('/', '~1')}"


def _number(value: Any, spec: Spec) -> Any:
    """`value` as a number the spec allows, or _MISSING; numeric strings convert as Joi does."""
    t = type(value)
    if t is str:
        if not _NUMBER.fullmatch(value):
            return _MISSING
        value = float(value)
        if value.is_integer() and abs(value) <= _MAX_SAFE:
            value = int(value)
    elif t is not int and t is not float:
        return _MISSING
    if t is float or type(value) is float:
        if not math.isfinite(value):
            return _MISSING
    if value > _MAX_SAFE or value < -_MAX_SAFE:
        return _MISSING
    if spec.minimum is not None and value < spec.minimum:
        return _MISSING
    if spec.maximum is not None and value > spec.maximum:
        return _MISSING
    return value


_STRING, _BOOLEAN, _NUMBER_T, _LIST, _REFS, _OBJECT = range(6)
_CODES = {
    "string": _STRING,
    "boolean": _BOOLEAN,
    "number": _NUMBER_T,
    "list": _LIST,
    "refs": _REFS,
    "object": _OBJECT,
}
_PLANS = {
    id(specs): tuple(
        (key, _CODES[spec.type], spec, spec.empty, spec.values, spec.minimum, spec.maximum)
        for key, spec in specs.items()
        if spec.type in _CODES
    )
    for specs in FIELDS.values()
}
"""Per kind: the fields `_Conform.fields` checks, unpacked once."""


def _fresh(spec: Spec) -> Any:
    if spec.type in ("list", "entities", "refs"):
        return []
    if spec.type == "object":
        return dict(TLS_DEFAULT)
    return spec.default


class _Conform:
    def __init__(self, strict: bool, notes: list[str] | None) -> None:
        self.strict = strict
        self.notes = notes
        self.taken: set[str] = set()
        self.renamed: dict[str, dict[str, str]] = {"route": {}, "folder": {}, "callback": {}}
        self.identity = False
        """Whether an entity or a reference was dropped, renamed or added."""

    # -- reporting --------------------------------------------------------------------------

    def refuse(self, ptr: str, what: str) -> None:
        raise ModelError(f"{ptr or '/'} must be {what}")

    def note(self, text: str) -> None:
        """Note a repair of an entity's identity or of a reference."""
        self.identity = True
        if self.notes is not None:
            self.notes.append(text)

    def note_value(self, text: str) -> None:
        """Note a repair of a value: the same whatever else the environment holds."""
        if self.notes is not None:
            self.notes.append(text)

    # -- the walk ---------------------------------------------------------------------------

    def run(self, env: dict[str, Any], env_id: str | None) -> bool:
        if env_id is not None:
            env["uuid"] = env_id
        uid = env.get("uuid", _MISSING)
        if uid is not _MISSING and type(uid) is not str:
            if self.strict:
                self.refuse("/uuid", "a string")
            del env["uuid"]  # the daemon always exports with its id; see docs/model.md
            self.note(f"/uuid: {_short(uid)} is not a string; dropped")
        elif type(uid) is str:
            self.taken.add(uid)  # kept even if no GUID: it is the environment's identity
        lists = {key: self.entities(env, key, "", _KIND[key]) for key in _ENTITY_LISTS}
        claimed: dict[str, set[str]] = {"route": set(), "folder": set(), "callback": set()}
        for key in _ENTITY_LISTS:
            kind = _KIND[key]
            for i, entity in enumerate(lists[key]):
                self.claim(entity, kind, "", _pointer(f"/{key}", i), claimed.get(kind))
        for i, route in enumerate(lists["routes"]):
            where = _pointer("/routes", i)
            responses = self.entities(route, "responses", where, "response")
            for j, response in enumerate(responses):
                self.claim(response, "response", route["uuid"], f"{where}/responses/{j}", None)
        for kind, names in self.renamed.items():  # only where no entity kept the old uuid
            for old in [o for o in names if o in claimed[kind]]:
                del names[old]
        self.fields(env, FIELDS["environment"], "")
        for key in _ENTITY_LISTS:
            kind = _KIND[key]
            specs = FIELDS[kind]
            for i, entity in enumerate(lists[key]):
                where = _pointer(f"/{key}", i)
                self.fields(entity, specs, where)
                if kind == "route":
                    for j, response in enumerate(entity["responses"]):
                        self.fields(response, FIELDS["response"], f"{where}/responses/{j}")
                elif kind in ("data", "callback"):
                    self.generated_id(entity, where)
        self.references(env)
        return self.identity

    def run_along(self, env: dict[str, Any], base: dict[str, Any]) -> bool:
        """`run` on what `env` does not share with `base` (see `conform_along`), visiting it in
        the order `run` does, so that the same notes come in the same order."""
        uid = env.get("uuid")
        if type(uid) is not str or uid != base.get("uuid"):
            return False
        lm, base_lm = env.get("lastMigration", _MISSING), base.get("lastMigration", _MISSING)
        if type(lm) is not type(base_lm) or lm != base_lm:
            return False  # the mode (strict or not) may change with it
        lists = {
            key: self.entities_along(env, key, "", _KIND[key], base.get(key))
            for key in _ENTITY_LISTS
        }
        # (key, index, entity, its responses not shared with base or None) of every entity
        # not shared with base; `recheck`: the uuids of the whole may no longer be unique
        changed: list[tuple[str, int, dict[str, Any], list[tuple[int, Any]] | None]] = []
        recheck = False
        for key in _ENTITY_LISTS:
            items, before = lists[key], base.get(key)
            if items is before:
                continue
            if type(before) is not list:
                return False
            n = len(before)
            same_length = len(items) == n
            if same_length:  # the places not shared with base, found at C speed
                places: Any = list(compress(range(n), map(is_not, items, before)))
            else:
                places, recheck = range(len(items)), True
            known = {id(e): e for e in before} if len(places) > 1 else {}
            by_uuid: dict[Any, Any] | None = None
            for i in places:
                entity = items[i]
                uid = entity.get("uuid")
                if same_length and uid != before[i].get("uuid"):
                    recheck = True  # moved, or another entity
                if known.get(id(entity)) is entity:
                    continue  # moved as it was
                if type(uid) is not str:
                    return False
                responses = None
                if key == "routes":
                    where = _pointer("/routes", i)
                    if same_length and uid == before[i].get("uuid"):
                        old = before[i]
                    else:
                        if by_uuid is None:
                            by_uuid = {e.get("uuid"): e for e in before}
                        old = by_uuid.get(uid)
                    old_responses = old.get("responses") if type(old) is dict else None
                    responses = self.entities_along(
                        entity, "responses", where, "response", old_responses
                    )
                    if responses is not old_responses:
                        if type(old_responses) is not list or [
                            r.get("uuid") for r in responses
                        ] != [r.get("uuid") for r in old_responses]:
                            recheck = True
                        same = {id(r): r for r in old_responses or ()}
                        responses = [
                            (j, r) for j, r in enumerate(responses) if same.get(id(r)) is not r
                        ]
                        if any(type(r.get("uuid")) is not str for _j, r in responses):
                            return False
                    else:
                        responses = []
                changed.append((key, i, entity, responses))
        if recheck and not self.unique_uuids(env, lists, changed):
            return False
        self.fields(env, FIELDS["environment"], "")
        refs = recheck or env.get(ROOT_REF_LIST) is not base.get(ROOT_REF_LIST)
        for key, i, entity, responses in changed:
            kind = _KIND[key]
            where = _pointer(f"/{key}", i)
            self.fields(entity, FIELDS[kind], where)
            if responses is not None:
                for j, response in responses:
                    self.fields(response, FIELDS["response"], f"{where}/responses/{j}")
            elif kind in ("data", "callback"):
                self.generated_id(entity, where)
            elif kind == "folder":
                refs = True
        if refs:
            # `references` rebuilds every folder's children: on copies, never on base's folders
            env["folders"] = [dict(f) for f in env["folders"]]
            self.references(env)
        return True

    def entities_along(
        self, parent: dict[str, Any], key: str, where: str, kind: str, before: Any
    ) -> list[Any]:
        """`entities`, looking only at the items not shared with `before` (base's list)."""
        items = parent.get(key)
        if type(items) is list and type(before) is list:
            if items is before:
                return items
            n = len(before)
            if all(type(e) is dict for e in compress(items, map(is_not, items, before))) and all(
                type(e) is dict for e in items[n:]
            ):
                return items
        return self.entities(parent, key, where, kind)

    def unique_uuids(
        self,
        env: dict[str, Any],
        lists: dict[str, list[Any]],
        changed: list[tuple[str, int, dict[str, Any], list[tuple[int, Any]] | None]],
    ) -> bool:
        """Whether every entity keeps its uuid as `run`'s claims go (each a GUID no other entity
        or the environment holds): then they change nothing. The uuids of the entities shared
        with base are GUIDs already; only the others' are parsed."""
        taken = {env["uuid"]}
        count = 1
        for key in _ENTITY_LISTS:
            for entity in lists[key]:
                taken.add(entity.get("uuid"))
                count += 1
                if key == "routes":
                    responses = entity.get("responses")
                    for response in responses if type(responses) is list else ():
                        taken.add(response.get("uuid") if type(response) is dict else None)
                        count += 1
        if len(taken) != count:
            return False
        for _key, _i, entity, responses in changed:
            if not is_guid(entity.get("uuid")):
                return False
            for _j, response in responses or ():
                if not is_guid(response.get("uuid")):
                    return False
        return True

    def entities(self, parent: dict[str, Any], key: str, where: str, kind: str) -> list[Any]:
        """`parent[key]` as a list of objects (missing: []); refuses or drops what is not."""
        ptr = _pointer(where, key)
        items = parent.get(key, _MISSING)
        if items is _MISSING:
            items = parent[key] = []
        elif type(items) is not list:
            if self.strict:
                self.refuse(ptr, "a list")
            self.note(f"{ptr}: {_short(items)} is not a list; emptied")
            items = parent[key] = []
        if all(type(e) is dict for e in items):
            return items
        kept = []
        for i, e in enumerate(items):
            if type(e) is dict:
                kept.append(e)
            elif self.strict:
                self.refuse(_pointer(ptr, i), f"an object (a {kind})")
            else:
                self.note(f"{_pointer(ptr, i)}: {_short(e)} is not an object; dropped")
        parent[key] = kept
        return kept

    def claim(
        self,
        entity: dict[str, Any],
        kind: str,
        scope: str,
        where: str,
        claimed: set[str] | None,
    ) -> None:
        """Give `entity` a uuid of its own: a GUID no other entity holds."""
        uid = entity.get("uuid", "")
        if type(uid) is not str:
            if self.strict:
                self.refuse(f"{where}/uuid", "a string")
            uid = ""
        if uid and is_guid(uid) and uid not in self.taken:
            self.taken.add(uid)
            if claimed is not None:
                claimed.add(uid)
            return
        new = derived_uuid(kind, scope if uid else f"{scope}/{where}", uid, self.taken)
        self.taken.add(new)
        entity["uuid"] = new
        if not uid:
            self.note(f"{where}{_label(entity)}: had no uuid; assigned {new}")
            return
        why = "duplicate uuid" if uid in self.taken else "uuid that is no GUID"
        self.note(f"{where}{_label(entity)}: {why} {uid}; assigned {new}")
        names = self.renamed.get(kind)
        if names is not None and uid not in names:
            names[uid] = new  # references to it follow, unless an entity kept `uid`

    def fields(self, obj: dict[str, Any], specs: dict[str, Spec], where: str) -> None:
        """The known fields of one object; entity lists and references are done elsewhere.

        On every write's path: valid values are recognised first, with as little work as can be.
        """
        for key, code, spec, empty, values, lo, hi in _PLANS[id(specs)]:
            value = obj.get(key, _MISSING)
            tv = type(value)
            if code == _STRING:
                if tv is str:
                    if (value or empty) and (values is None or value in values):
                        continue
                    self.bad_value(obj, key, spec, where, value)
                elif value is None and spec.null:
                    continue
                elif value is _MISSING:
                    if spec.default is not None or spec.null:
                        obj[key] = spec.default
                else:
                    self.wrong_type(obj, key, spec, where)
            elif code == _BOOLEAN:
                if tv is bool:
                    continue
                if value is _MISSING:
                    obj[key] = spec.default
                else:
                    self.wrong_type(obj, key, spec, where)
            elif code == _NUMBER_T:
                if tv is int or tv is float:
                    if (
                        -_MAX_SAFE <= value <= _MAX_SAFE
                        and (lo is None or value >= lo)
                        and (hi is None or value <= hi)
                    ):
                        continue  # (NaN fails every comparison)
                    self.bad_value(obj, key, spec, where, value)
                elif value is _MISSING:
                    obj[key] = spec.default
                elif self.strict or tv is not str:
                    self.wrong_type(obj, key, spec, where)
                else:
                    number = _number(value, spec)
                    if number is _MISSING:
                        self.wrong_type(obj, key, spec, where)
                    else:
                        obj[key] = number
                        self.note_value(f"{where}/{key}: {_short(value)} made a number")
            elif code == _LIST:
                if tv is list:
                    if value:
                        self.items(value, spec.items, f"{where}/{key}")
                elif value is _MISSING:
                    obj[key] = []
                else:
                    self.wrong_type(obj, key, spec, where)
            elif code == _REFS:
                if value is _MISSING:
                    obj[key] = []
                elif tv is not list:
                    self.wrong_type(obj, key, spec, where)
            elif tv is dict:  # _OBJECT
                self.fields(value, FIELDS[spec.items], f"{where}/{key}")
            elif value is _MISSING:
                obj[key] = _fresh(spec)
            else:
                self.wrong_type(obj, key, spec, where)

    def wrong_type(self, obj: dict[str, Any], key: str, spec: Spec, where: str) -> None:
        if self.strict:
            self.refuse(_pointer(where, key), spec.expected())
        old = obj[key]
        obj[key] = _fresh(spec)
        if self.notes is not None:
            self.note_value(
                f"{_pointer(where, key)}: {_short(old)} is not {spec.expected()};"
                f" Mockoon's default {_short(obj[key])} instead"
            )

    def bad_value(self, obj: dict[str, Any], key: str, spec: Spec, where: str, old: Any) -> None:
        obj[key] = _fresh(spec)
        self.note_value(
            f"{_pointer(where, key)}: {_short(old)} is not allowed (it must be {spec.expected()});"
            f" Mockoon's default {_short(obj[key])} instead"
        )

    def items(self, items: list[Any], kind: str, where: str) -> None:
        """A list of plain objects: headers, rules or callback links."""
        specs = FIELDS[kind]
        if kind == "callbackRef":
            self.callback_links(items, where)
            return
        for i, item in enumerate(items):
            if type(item) is dict:
                self.fields(item, specs, f"{where}/{i}")
            elif self.strict:
                self.refuse(_pointer(where, i), f"an object (a {kind})")
            else:
                items[i] = dict(ITEM_DEFAULTS[kind])
                self.note_value(
                    f"{_pointer(where, i)}: {_short(item)} is not an object; Mockoon's default"
                )

    def callback_links(self, items: list[Any], where: str) -> None:
        """`{uuid, latency}` links of a response to the environment's callbacks.

        Mockoon's loader drops a link it cannot repair (it has no failover), and so does this.
        """
        renamed = self.renamed["callback"]
        spec = FIELDS["callbackRef"]["latency"]
        kept: list[Any] = []
        for i, link in enumerate(items):
            ptr = _pointer(where, i)
            if type(link) is not dict:
                if self.strict:
                    self.refuse(ptr, "an object (a callback link)")
                self.note(f"{ptr}: dropped {_short(link)}, which is no callback link")
                continue
            uid = link.get("uuid", _MISSING)
            if type(uid) is not str:
                if self.strict:
                    self.refuse(f"{ptr}/uuid", "a string")
                self.note(f"{ptr}: dropped a callback link without a uuid")
                continue
            if uid in renamed:
                link["uuid"] = uid = renamed[uid]
            if not is_guid(uid):
                self.note(f"{ptr}: dropped a link to callback {uid!r}, which is no GUID")
                continue
            latency = link.get("latency", _MISSING)
            if latency is _MISSING:
                link["latency"] = 0
            elif type(latency) not in (int, float):
                if self.strict:
                    self.refuse(f"{ptr}/latency", "a number")
                self.note(f"{ptr}: dropped a callback link whose latency is no number")
                continue
            elif _number(latency, spec) is _MISSING:
                self.note(f"{ptr}: dropped a link whose latency {_short(latency)} is no number")
                continue
            kept.append(link)
        if len(kept) != len(items):
            items[:] = kept

    def generated_id(self, entity: dict[str, Any], where: str) -> None:
        value = entity.get("id", _MISSING)
        if type(value) is str:
            return
        if value is not _MISSING and self.strict:
            self.refuse(f"{where}/id", "a string")
        entity["id"] = derived_id(entity["uuid"])

    # -- references ---------------------------------------------------------------------------

    def references(self, env: dict[str, Any]) -> None:
        """Make rootChildren and folders' children a forest holding every route and folder once.

        References are walked depth first from rootChildren; the first reference to an entity
        wins, so concurrent moves of one route into two folders resolve the same way on every
        replica. Unreachable folders, then routes, are appended to rootChildren in list order.
        Iterative: folders may nest as deep as a document can make them.
        """
        routes = {r["uuid"] for r in env["routes"]}
        folders = {f["uuid"]: (i, f) for i, f in enumerate(env["folders"])}
        seen: set[tuple[str, str]] = set()

        def walk(refs: list[Any], kept: list[Any], where: str) -> None:
            stack = [(refs, kept, iter(range(len(refs))), where)]
            while stack:
                source, out, indexes, ptr = stack[-1]
                for i in indexes:
                    ref = source[i]
                    if not self.valid_ref(ref, _pointer(ptr, i)):
                        continue
                    rtype, uid = ref["type"], ref["uuid"]
                    if uid not in (routes if rtype == "route" else folders):
                        self.note(f"{ptr}: dropped a reference to a missing {rtype} {uid}")
                        continue
                    if (rtype, uid) in seen:
                        self.note(f"{ptr}: dropped a second reference to {rtype} {uid}")
                        continue
                    seen.add((rtype, uid))
                    out.append(ref)
                    if rtype == "folder":
                        index, folder = folders[uid]
                        children, folder["children"] = folder["children"], []
                        stack.append(
                            (
                                children,
                                folder["children"],
                                iter(range(len(children))),
                                f"/folders/{index}/children",
                            )
                        )
                        break
                else:
                    stack.pop()

        refs, env[ROOT_REF_LIST] = env[ROOT_REF_LIST], []
        root = env[ROOT_REF_LIST]
        walk(refs, root, f"/{ROOT_REF_LIST}")
        for uid, (index, folder) in folders.items():
            if ("folder", uid) not in seen:
                seen.add(("folder", uid))
                self.note(f"/{ROOT_REF_LIST}: added folder {uid} that nothing held")
                root.append({"type": "folder", "uuid": uid})
                children, folder["children"] = folder["children"], []
                walk(children, folder["children"], f"/folders/{index}/children")
        for route in env["routes"]:
            uid = route["uuid"]
            if ("route", uid) not in seen:
                seen.add(("route", uid))
                self.note(f"/{ROOT_REF_LIST}: added route {uid} that no folder held")
                root.append({"type": "route", "uuid": uid})

    def valid_ref(self, ref: Any, ptr: str) -> bool:
        """A {type, uuid} reference, renamed along with its entity; notes or refuses the rest."""
        if type(ref) is not dict:
            if self.strict:
                self.refuse(ptr, "an object (a {type, uuid} reference)")
            self.note(f"{ptr}: dropped {_short(ref)}, which is no reference")
            return False
        rtype, uid = ref.get("type"), ref.get("uuid")
        if type(uid) is not str or type(rtype) is not str:
            if self.strict:
                self.refuse(ptr, "a {type, uuid} reference with string type and uuid")
            self.note(f"{ptr}: dropped {_short(ref)}, which is no reference")
            return False
        if rtype not in ("route", "folder"):
            self.note(f"{ptr}: dropped a reference of type {rtype!r}")
            return False
        new = self.renamed[rtype].get(uid)
        if new is not None:
            ref["uuid"] = new
        return True


def _label(item: dict[str, Any]) -> str:
    for k in ("endpoint", "name", "label"):
        if isinstance(item.get(k), str) and item[k]:
            return f" ({item[k]})"
    return ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_SCALARS = (str, int, float, bool, type(None))


def check_json(value: Any) -> None:
    """Refuse what is not JSON, or nested deeper than MAX_DEPTH (what a read would drop).

    Iterative, so that no depth costs stack. Callers hand parsed JSON (or CBOR) here; bytes,
    tuples or non-string keys are refused by their JSON Pointer.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, ptr, depth = stack.pop()
        t = type(v)
        if t is dict:
            if depth > MAX_DEPTH:
                raise ModelError(f"{ptr or '/'} is nested more than {MAX_DEPTH} levels deep")
            for k, child in v.items():
                if type(k) is not str:
                    raise ModelError(f"{ptr or '/'} has a key that is no string: {_short(k)}")
                if type(child) in _SCALARS:
                    continue
                stack.append((child, _pointer(ptr, k), depth + 1))
        elif t is list:
            if depth > MAX_DEPTH:
                raise ModelError(f"{ptr or '/'} is nested more than {MAX_DEPTH} levels deep")
            for i, child in enumerate(v):
                if type(child) in _SCALARS:
                    continue
                stack.append((child, _pointer(ptr, i), depth + 1))
        elif t not in _SCALARS:
            raise ModelError(f"{ptr or '/'} must be a JSON value, not {t.__name__}")
