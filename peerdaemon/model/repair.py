"""Checks and repairs of environment JSON, as Mockoon's own loader does them.

Used both on import (so what enters a document is valid) and on every export (so what any merge
produced is valid: merges of concurrent moves can duplicate or orphan references, and a Yjs
client may write anything). Repairs are deterministic, so every replica exports the same JSON.
"""

from __future__ import annotations

import math
from typing import Any

from .schema import LAST_MIGRATION, ROOT_ENTITY_LISTS, ROOT_REF_LIST, entity_defaults


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
        raise NotAnEnvironment("lastMigration must be a number")
    if not isinstance(obj.get("uuid"), str) and lm is None:
        raise NotAnEnvironment("not a Mockoon environment: it has neither uuid nor lastMigration")
    routes = obj.get("routes")
    if routes is not None and not isinstance(routes, list):
        raise NotAnEnvironment("routes must be a list")
    if "uuid" in obj and (not isinstance(obj["uuid"], str) or not obj["uuid"]):
        raise NotAnEnvironment("uuid must be a non-empty string")


def check_storable(env: dict[str, Any]) -> None:
    """Refuse a newer file the layout cannot hold as it is (it is stored without any repair).

    Entity lists are stored by uuid: they must be lists of objects with distinct uuids.
    """
    for key in ROOT_ENTITY_LISTS:
        if key in env:
            _check_entity_list(env[key], key)
    for i, route in enumerate(env.get("routes", [])):
        responses = route.get("responses")
        if isinstance(responses, list | dict):
            _check_entity_list(responses, f"routes[{i}].responses")
    if ROOT_REF_LIST in env and not isinstance(env[ROOT_REF_LIST], list):
        raise ModelError(f"{ROOT_REF_LIST} must be a list in a file from a newer Mockoon")


def _check_entity_list(items: Any, where: str) -> None:
    if not isinstance(items, list):
        raise ModelError(f"{where} must be a list in a file from a newer Mockoon")
    seen: set[str] = set()
    for i, item in enumerate(items):
        uid = item.get("uuid") if isinstance(item, dict) else None
        if not isinstance(uid, str) or not uid or uid in seen:
            raise ModelError(
                f"{where}[{i}] has no uuid of its own: a file from a newer Mockoon is stored"
                " as it is, and this one cannot be"
            )
        seen.add(uid)


def is_newer(env: dict[str, Any]) -> bool:
    """A file from a Mockoon newer than this model: kept as it is, and flagged."""
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
    return "an object"


def repair(env: dict[str, Any]) -> list[str]:
    """Repair `env` in place the way Mockoon repairs a file it loads; return what was repaired."""
    notes: list[str] = []
    if is_newer(env):
        return notes
    for key, kind in ROOT_ENTITY_LISTS.items():
        if key in env:
            env[key] = _repair_entities(env[key], kind, key, notes)
    for i, route in enumerate(env.get("routes", [])):
        route["responses"] = _repair_entities(
            route.get("responses", []), "response", f"routes[{i}].responses", notes
        )
    for i, folder in enumerate(env.get("folders", [])):
        if not isinstance(folder.get("children"), list):
            folder["children"] = []
            notes.append(f"folders[{i}].children: not a list, emptied")
    if ROOT_REF_LIST in env or env.get("lastMigration") == LAST_MIGRATION:
        _repair_refs(env, notes)
    return notes


def _repair_entities(items: Any, kind: str, where: str, notes: list[str]) -> list[Any]:
    if not isinstance(items, list):
        notes.append(f"{where}: not a list, emptied")
        return []
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            notes.append(f"{where}[{i}]: {_json_type(item)}, not an object; dropped")
            continue
        uid = item.get("uuid")
        if not isinstance(uid, str) or not uid:
            defaults = entity_defaults(kind)
            added = [k for k in defaults if k not in item and k != "uuid"]
            for k, v in defaults.items():
                if k not in item or k == "uuid":
                    item[k] = v
            label = _label(item)
            notes.append(
                f"{where}[{i}]{label}: had no uuid; assigned {item['uuid']}"
                + (f" and Mockoon's defaults for {', '.join(added)}" if added else "")
            )
        elif uid in seen:
            new = entity_defaults(kind)["uuid"]
            notes.append(f"{where}[{i}]: duplicate uuid {uid}; assigned {new}")
            item["uuid"] = new
        seen.add(item["uuid"])
        out.append(item)
    return out


def _label(item: dict[str, Any]) -> str:
    for k in ("endpoint", "name", "label"):
        if isinstance(item.get(k), str) and item[k]:
            return f" ({item[k]})"
    return ""


def _repair_refs(env: dict[str, Any], notes: list[str]) -> None:
    """Make rootChildren and folders' children a forest holding every route and folder once.

    References are walked depth first from rootChildren; the first reference to an entity wins,
    so concurrent moves of one route into two folders resolve the same way on every replica.
    Unreachable folders, then routes, are appended to rootChildren in their list order.
    """
    routes = {r["uuid"] for r in env.get("routes", []) if isinstance(r, dict)}
    folders = {f["uuid"]: f for f in env.get("folders", []) if isinstance(f, dict)}
    seen: set[tuple[str, str]] = set()

    def walk(refs: Any, where: str) -> list[dict[str, Any]]:
        if not isinstance(refs, list):
            notes.append(f"{where}: not a list, emptied")
            return []
        kept: list[dict[str, Any]] = []
        for ref in refs:
            if not isinstance(ref, dict):
                notes.append(f"{where}: dropped a reference that is not an object")
                continue
            rtype, uid = ref.get("type"), ref.get("uuid")
            exists = (rtype == "route" and uid in routes) or (rtype == "folder" and uid in folders)
            if not exists:
                notes.append(f"{where}: dropped a reference to a missing {rtype} {uid}")
                continue
            if (rtype, uid) in seen:
                notes.append(f"{where}: dropped a second reference to {rtype} {uid}")
                continue
            seen.add((rtype, uid))
            kept.append(ref)
            if rtype == "folder":
                folder = folders[uid]
                folder["children"] = walk(folder.get("children", []), f"folder {uid}")
        return kept

    root = walk(env.get(ROOT_REF_LIST, []), ROOT_REF_LIST)
    for uid, folder in folders.items():
        if ("folder", uid) not in seen:
            seen.add(("folder", uid))
            notes.append(f"{ROOT_REF_LIST}: added folder {uid} that nothing held")
            root.append({"type": "folder", "uuid": uid})
            folder["children"] = walk(folder.get("children", []), f"folder {uid}")
    for route in env.get("routes", []):
        uid = route["uuid"]
        if ("route", uid) not in seen:
            seen.add(("route", uid))
            notes.append(f"{ROOT_REF_LIST}: added route {uid} that no folder held")
            root.append({"type": "route", "uuid": uid})
    env[ROOT_REF_LIST] = root
