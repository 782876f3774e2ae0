"""Helpers for the model tests: strict JSON equality, replicas and syncing, a validity checker."""

import copy
import json
import math
import re
from pathlib import Path

from pycrdt import Doc

from peerdaemon.model import apply_environment, export_environment, import_environment, prepare

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "mockoon"  # provenance: its README


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
    seen = set()
    pending = [(env["rootChildren"], "rootChildren", 0)]  # iterative: folders may nest deep
    while pending:
        refs, where, depth = pending.pop()
        assert depth <= len(folders) + 1, f"{where}: folders nest in a cycle"
        assert isinstance(refs, list), f"{where} is not a list"
        for ref in refs:
            assert isinstance(ref, dict), f"{where}: reference {ref!r} is not an object"
            rtype, uid = ref.get("type"), ref.get("uuid")
            assert rtype in ("route", "folder"), f"{where}: reference of type {rtype!r}"
            key = (rtype, uid)
            assert key not in seen, f"{where}: {rtype} {uid} referenced twice"
            seen.add(key)
            if rtype == "route":
                assert uid in routes, f"{where}: dangling reference to route {uid}"
            else:
                assert uid in folders, f"{where}: dangling reference to folder {uid}"
                pending.append((folders[uid].get("children"), f"folder {uid}", depth + 1))
    reached_routes = {u for t, u in seen if t == "route"}
    reached_folders = {u for t, u in seen if t == "folder"}
    assert reached_routes == routes, f"routes not reachable: {sorted(routes - reached_routes)}"
    assert reached_folders == set(folders), (
        f"folders not reachable: {sorted(set(folders) - reached_folders)}"
    )


# ---------------------------------------------------------------------------------------------
# Mockoon's strict schema, written out independently of peerdaemon.model.schema


_GUID = re.compile(
    r"([\[{(]?)[0-9A-F]{8}([:-]?)[0-9A-F]{4}\2?[0-9A-F]{4}\2?[0-9A-F]{4}\2?[0-9A-F]{12}([\]})]?)",
    re.I | re.A,
)
_METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "propfind", "proppatch"}
_METHODS |= {"move", "copy", "mkcol", "lock", "unlock"}
_BODY_TYPES = {"INLINE", "FILE", "DATABUCKET"}
_TARGETS = {"body", "query", "header", "cookie", "params", "path", "method", "request_number"}
_TARGETS |= {"global_var", "data_bucket", "templating"}
_OPERATORS = {"equals", "regex", "regex_i", "null", "empty_array", "array_includes"}
_OPERATORS |= {"valid_json_schema"}


def is_guid(v):
    m = isinstance(v, str) and _GUID.fullmatch(v)
    return bool(m) and {"": "", "[": "]", "{": "}", "(": ")"}[m.group(1)] == m.group(3)


def _string(empty=True, values=None, null=False):
    def check(v):
        if v is None:
            return null
        return isinstance(v, str) and (empty or v != "") and (values is None or v in values)

    return check


def _number(lo=None, hi=None):
    def check(v):
        return (
            type(v) in (int, float)
            and math.isfinite(v)
            and abs(v) <= 2**53 - 1
            and (lo is None or v >= lo)
            and (hi is None or v <= hi)
        )

    return check


def _bool(v):
    return type(v) is bool


def _list_of(shape):
    def check(v):
        return isinstance(v, list) and all(_matches(item, shape) for item in v)

    return check


def _matches(obj, shape):
    return isinstance(obj, dict) and not _shape_errors(obj, shape, "")


def _shape_errors(obj, shape, where):
    if not isinstance(obj, dict):
        return [f"{where or '/'}: not an object"]
    errors = []
    for key, check in shape.items():
        optional = key.endswith("?")
        key = key.rstrip("?")
        if key not in obj:
            if not optional:
                errors.append(f"{where}/{key}: required")
        elif isinstance(check, dict):
            errors += _shape_errors(obj[key], check, f"{where}/{key}")
        elif isinstance(check, tuple):  # a list of objects of a shape
            if not isinstance(obj[key], list):
                errors.append(f"{where}/{key}: not a list")
            else:
                for i, item in enumerate(obj[key]):
                    errors += _shape_errors(item, check[0], f"{where}/{key}/{i}")
        elif not check(obj[key]):
            errors.append(f"{where}/{key}: {obj[key]!r:.60} is not allowed")
    return errors


_STR = _string()
_HEADER = {"key": _STR, "value": _STR}
_REF = {"uuid": is_guid, "type": _string(values={"route", "folder"})}
_RESPONSE = {
    "uuid": is_guid,
    "body": _STR,
    "latency": _number(0),
    "statusCode": _number(100, 999),
    "label": _STR,
    "headers": (_HEADER,),
    "bodyType": _string(values=_BODY_TYPES),
    "filePath": _STR,
    "databucketID": _STR,
    "sendFileAsBody": _bool,
    "rules": (
        {
            "target": _string(values=_TARGETS),
            "modifier": _STR,
            "value": _STR,
            "invert": _bool,
            "operator": _string(values=_OPERATORS),
        },
    ),
    "rulesOperator": _string(values={"OR", "AND"}),
    "disableTemplating": _bool,
    "fallbackTo404": _bool,
    "default": _bool,
    "crudKey": _string(empty=False),
    "callbacks": ({"uuid": is_guid, "latency?": _number()},),
}
_ROUTE = {
    "uuid": is_guid,
    "type": _string(values={"http", "crud", "ws"}),
    "documentation": _STR,
    "method": _string(values=_METHODS | {"", "all"}),
    "endpoint": _STR,
    "responses": (_RESPONSE,),
    "responseMode": _string(
        values={"RANDOM", "SEQUENTIAL", "DISABLE_RULES", "FALLBACK"}, null=True
    ),
    "streamingMode": _string(values={"UNICAST", "BROADCAST"}, null=True),
    "streamingInterval": _number(0),
}
MOCKOON_STRICT = {
    "uuid": is_guid,
    "lastMigration": _number(),
    "name": _STR,
    "endpointPrefix": _STR,
    "latency": _number(0),
    "port": _number(0, 65535),
    "hostname": _STR,
    "rootChildren": (_REF,),
    "folders": ({"uuid": is_guid, "name": _STR, "children": (_REF,)},),
    "routes": (_ROUTE,),
    "proxyMode": _bool,
    "proxyHost": _STR,
    "proxyRemovePrefix": _bool,
    "tlsOptions?": {
        "enabled": _bool,
        "type": _string(values={"CERT", "PFX"}),
        **{k: _STR for k in ("pfxPath", "certPath", "keyPath", "caPath", "passphrase")},
    },
    "cors": _bool,
    "headers": (_HEADER,),
    "proxyReqHeaders": (_HEADER,),
    "proxyResHeaders": (_HEADER,),
    "data": ({"uuid": is_guid, "id": _STR, "name": _STR, "documentation": _STR, "value": _STR},),
    "callbacks": (
        {
            "uuid": is_guid,
            "id": _STR,
            "name": _string(empty=False),
            "documentation": _STR,
            "method": _string(values=_METHODS),
            "uri": _STR,
            "headers": (_HEADER,),
            "body": _STR,
            "bodyType": _string(values=_BODY_TYPES),
            "filePath": _STR,
            "sendFileAsBody": _bool,
            "databucketID": _STR,
        },
    ),
}


def _plain_json(value):
    """Only JSON types, finite numbers, and shallow enough to need no deep recursion."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        assert depth <= 70, "nested too deeply"
        if isinstance(v, dict):
            assert type(v) is dict and all(type(k) is str for k in v), (
                f"not a JSON object: {v!r:.60}"
            )
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            assert type(v) is list, f"not a JSON list: {v!r:.60}"
            stack.extend((x, depth + 1) for x in v)
        else:
            assert v is None or type(v) in (str, int, float, bool), f"not JSON: {v!r:.60}"
            assert type(v) is not float or math.isfinite(v), f"not finite: {v!r}"


def assert_mockoon_strict(env):
    """What Mockoon's strict schema (EnvironmentSchemaNoFix, @mockoon/commons 9.9.0) accepts,
    plus: plain JSON, every uuid unique across the environment, and references that Mockoon's
    repairRefs would not change (assert_valid_environment)."""
    _plain_json(env)
    json.dumps(env, allow_nan=False)
    errors = _shape_errors(env, MOCKOON_STRICT, "")
    assert not errors, f"not valid by Mockoon's strict schema: {errors[:8]}"
    uuids = [env["uuid"]]
    for key in ENTITY_LISTS:
        uuids += [e["uuid"] for e in env[key]]
    uuids += [r["uuid"] for route in env["routes"] for r in route["responses"]]
    dupes = sorted({u for u in uuids if uuids.count(u) > 1})
    assert not dupes, f"uuids held twice: {dupes}"
    assert_valid_environment(env)


def kept_diff(original, repaired, path="$"):
    """None when `repaired` holds all of `original` (strictly equal values at the same places),
    objects having perhaps gained keys; else the first difference."""
    if isinstance(original, dict) and isinstance(repaired, dict):
        missing = sorted(set(original) - set(repaired))
        if missing:
            return f"{path}: lost keys {missing}"
        for k in original:
            d = kept_diff(original[k], repaired[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(original, list) and isinstance(repaired, list):
        if len(original) != len(repaired):
            return f"{path}: list length {len(original)} != {len(repaired)}"
        for i, (x, y) in enumerate(zip(original, repaired, strict=True)):
            d = kept_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return strict_diff(original, repaired, path)


def assert_kept_with_defaults(original, repaired):
    """`repaired` is `original` with Mockoon's defaults added for missing fields, nothing else."""
    d = kept_diff(original, repaired)
    assert d is None, d
    assert_mockoon_strict(repaired)
