"""Where the reference repair puts routes and folders that nothing holds (docs/model.md).

Through the public API only (`prepare`, `export_environment`, the documented Yjs layout), so
that these hold whatever the repairs look like inside: every replica must place what it
re-attaches in the same, documented order (folders, then routes, each in list order), or the
exports of converged replicas would differ from what Mockoon shows.
"""

from __future__ import annotations

import copy
from typing import Any

from modelutil import load
from pycrdt import Array

from peerdaemon.model import export_environment, import_environment, prepare

# uuids in neither sorted nor reverse-sorted list order, so only list order passes
FOLDERS = tuple(f"f{i}000000-0000-4000-8000-00000000000{i}" for i in (2, 3, 1, 4))
ROUTES = tuple(f"a{i}000000-0000-4000-8000-00000000000{i}" for i in (2, 3, 1))


def environment() -> dict[str, Any]:
    """test-env.json with extra routes and empty folders that no reference holds yet."""
    env = load("test-env.json")
    template = env["routes"][0]
    for uid in ROUTES:
        r = copy.deepcopy(template)
        r["uuid"], r["endpoint"] = uid, f"route-{uid[:2]}"
        r["responses"][0]["uuid"] = "b" + uid[1:]
        env["routes"].append(r)
    env["folders"] = [{"uuid": uid, "name": uid[:2], "children": []} for uid in FOLDERS]
    return env


def refs(kind: str, uids: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    return [{"type": kind, "uuid": uid} for uid in uids]


def test_prepare_appends_unreachable_folders_then_routes_in_list_order():
    env = environment()
    held = env["rootChildren"]  # the fixture's own routes, already referenced
    assert held and all(ref["type"] == "route" for ref in held)
    out, notes = prepare(env)
    assert out["rootChildren"] == held + refs("folder", FOLDERS) + refs("route", ROUTES)
    assert [f["uuid"] for f in out["folders"]] == list(FOLDERS)
    assert notes  # the repair says what it re-attached


def test_prepare_keeps_reachable_ones_where_they_are():
    """Only what nothing holds moves: what a held folder holds keeps its place there."""
    env = environment()
    env["folders"][2]["children"] = refs("folder", [FOLDERS[0]]) + refs("route", [ROUTES[1]])
    held = env["rootChildren"] + refs("folder", [FOLDERS[2]])
    env["rootChildren"] = copy.deepcopy(held)
    out, _ = prepare(env)
    assert out["rootChildren"] == held + refs("folder", [FOLDERS[1], FOLDERS[3]]) + refs(
        "route", [ROUTES[0], ROUTES[2]]
    )
    inner = next(f for f in out["folders"] if f["uuid"] == FOLDERS[2])
    assert inner["children"] == refs("folder", [FOLDERS[0]]) + refs("route", [ROUTES[1]])


def test_export_reattaches_what_a_client_unlinked_in_list_order():
    """A Yjs client deletes every reference from rootChildren (a merge of concurrent moves can
    do the same): the export places them all again, folders then routes, in list order."""
    env = environment()
    env["rootChildren"] = (
        refs("folder", list(reversed(FOLDERS)))
        + env["rootChildren"][::-1]
        + refs("route", list(reversed(ROUTES)))
    )
    doc, prepared, _ = import_environment(env)
    assert prepared["rootChildren"] == env["rootChildren"]  # nothing to repair yet
    root = doc.get("rootChildren", type=Array)
    del root[0 : len(root)]
    out = export_environment(doc)
    route_ids = [r["uuid"] for r in out["routes"]]
    assert out["rootChildren"] == refs("folder", FOLDERS) + refs("route", route_ids)
