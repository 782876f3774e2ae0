"""Helpers for the model tests: strict JSON equality, replicas and syncing, a validity checker."""

import copy
import json
import os
from pathlib import Path

from pycrdt import Doc

from peerdaemon.model import apply_environment, export_environment, import_environment, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared"  # shared/ beside the checkout
FIXTURE_DIR = Path(os.environ.get("PEERDAEMON_FIXTURES", SHARED / "fixtures" / "mockoon"))


def fixture_names():
    return sorted(p.name for p in FIXTURE_DIR.glob("*.json"))


def load(name):
    return json.loads((FIXTURE_DIR / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# strict JSON equality: int, float and bool are different types; key sets and list order matter


def strict_diff(a, b, path="$"):
    """The first difference between two JSON values, or None when they are strictly equal."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} {a!r:.80} != {type(b).__name__} {b!r:.80}"
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{path}: keys only left {sorted(set(a) - set(b))}, only right {sorted(set(b) - set(a))}"
        for k in a:
            d = strict_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: list length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = strict_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and a != a and b != b:  # NaN
        return None
    if a != b:
        return f"{path}: {a!r:.200} != {b!r:.200}"
    return None


def assert_strict_equal(a, b):
    d = strict_diff(a, b)
    assert d is None, d


# ---------------------------------------------------------------------------------------------
# replicas


def sync_pair(a, b):
    """Exchange updates both ways."""
    b.apply_update(a.get_update(b.get_state()))
    a.apply_update(b.get_update(a.get_state()))


def sync_all(*docs):
    """Full sync: after it every replica has every update."""
    for a in docs:
        for b in docs:
            if a is not b:
                b.apply_update(a.get_update(b.get_state()))


def clone(doc):
    """A new replica (own client id) holding everything `doc` holds."""
    other = Doc()
    other.apply_update(doc.get_update())
    return other


def replicas(env, n=2):
    """`n` synced replicas of `env`: the first imports it, the others receive its update."""
    first, _, _ = import_environment(env)
    return [first] + [clone(first) for _ in range(n - 1)]


def edit(doc, change):
    """Edit as the daemon does: export, change a copy of the JSON, apply it as a whole file.

    `change(env)` mutates the JSON in place (what it returns is ignored). Returns the applied JSON.
    """
    before = export_environment(doc)
    env = copy.deepcopy(before)
    change(env)
    prepared, _ = prepare(env)
    apply_environment(doc, prepared, old=before)  # guided by the previous export, as the daemon
    # the daemon caches `prepared` as the new export: it must be exactly what the document exports
    assert_strict_equal(export_environment(doc), prepared)
    return prepared


def assert_converged(*docs):
    """Every replica exports the same JSON (strictly); returns it, checked for validity."""
    first = export_environment(docs[0])
    for other in docs[1:]:
        assert_strict_equal(export_environment(other), first)
    assert_valid_environment(first)
    return first


# ---------------------------------------------------------------------------------------------
# finding things in environment JSON


def route(env, uuid):
    return next(r for r in env["routes"] if r["uuid"] == uuid)


def route_ids(env):
    return [r["uuid"] for r in env["routes"]]


def refs_to(env, uuid):
    """Every {type, uuid} reference to `uuid`, anywhere in the tree of references."""
    found = [r for r in env.get("rootChildren", []) if r.get("uuid") == uuid]
    for folder in env.get("folders", []):
        found += [r for r in folder.get("children", []) if r.get("uuid") == uuid]
    return found


def tree_order(env):
    """Route uuids in the order the tree shows them (depth first from rootChildren)."""
    folders = {f["uuid"]: f for f in env.get("folders", [])}
    out = []

    def walk(refs):
        for ref in refs:
            if ref["type"] == "route":
                out.append(ref["uuid"])
            else:
                walk(folders[ref["uuid"]]["children"])

    walk(env.get("rootChildren", []))
    return out


# ---------------------------------------------------------------------------------------------
# validity


ENTITY_LISTS = ("routes", "folders", "data", "callbacks")


def _assert_entities(items, where):
    assert isinstance(items, list), f"{where} is {type(items).__name__}, not a list"
    uuids = []
    for i, item in enumerate(items):
        assert isinstance(item, dict), f"{where}[{i}] is {type(item).__name__}, not an object"
        assert isinstance(item.get("uuid"), str) and item["uuid"], f"{where}[{i}] has no uuid"
        uuids.append(item["uuid"])
    dupes = {u for u in uuids if uuids.count(u) > 1}
    assert not dupes, f"{where}: duplicate uuids {sorted(dupes)}"
    return uuids


def assert_valid_environment(env):
    """A Mockoon environment Mockoon loads without repairing anything.

    Entity lists are lists of objects with unique uuids; rootChildren and the folders' children
    form a forest with no dangling, duplicate or malformed reference, in which every route and
    every folder appears exactly once.
    """
    assert isinstance(env, dict), "an environment is an object"
    for key in ENTITY_LISTS:
        if key in env:
            _assert_entities(env[key], key)
    for i, r in enumerate(env.get("routes", [])):
        assert "responses" in r, f"routes[{i}] has no responses"
        _assert_entities(r["responses"], f"routes[{i}].responses")
    routes = {r["uuid"] for r in env.get("routes", [])}
    folders = {f["uuid"]: f for f in env.get("folders", [])}
    if "rootChildren" not in env:
        assert not routes and not folders, "routes or folders but no rootChildren"
        return
    seen = []

    def walk(refs, where, depth):
        assert depth <= len(folders) + 1, f"{where}: folders nest in a cycle"
        assert isinstance(refs, list), f"{where} is not a list"
        for ref in refs:
            assert isinstance(ref, dict), f"{where}: reference {ref!r} is not an object"
            rtype, uid = ref.get("type"), ref.get("uuid")
            assert rtype in ("route", "folder"), f"{where}: reference of type {rtype!r}"
            key = (rtype, uid)
            assert key not in seen, f"{where}: {rtype} {uid} referenced twice"
            seen.append(key)
            if rtype == "route":
                assert uid in routes, f"{where}: dangling reference to route {uid}"
            else:
                assert uid in folders, f"{where}: dangling reference to folder {uid}"
                walk(folders[uid].get("children"), f"folder {uid}", depth + 1)

    walk(env["rootChildren"], "rootChildren", 0)
    reached_routes = {u for t, u in seen if t == "route"}
    reached_folders = {u for t, u in seen if t == "folder"}
    assert reached_routes == routes, f"routes not reachable: {sorted(routes - reached_routes)}"
    assert reached_folders == set(folders), (
        f"folders not reachable: {sorted(set(folders) - reached_folders)}"
    )
