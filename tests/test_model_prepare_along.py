"""`prepare(env, env_id, base)`: a patched export prepared along what it shares with the export
gives exactly what the whole walk gives (the same JSON, notes and errors), never changes the
export, and keeps sharing what the patch did not touch (which is what makes it cheap)."""

import copy
import json
import uuid

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelutil import assert_strict_equal, fixture_names, load

from peerdaemon.model import ModelError, export_environment, import_environment, prepare
from peerdaemon.operations.environments import patch_along

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FIXTURES = [n for n in fixture_names() if n != "incompatible.json"]
_BASES: dict[str, dict] = {}


def base_of(name: str) -> dict:
    """The cached export of a fixture, as the registry holds it (never to be changed)."""
    if name not in _BASES:
        env = load(name)
        doc, prepared, _ = import_environment(env, env.get("uuid") or "e")
        _BASES[name] = export_environment(doc, prepared["uuid"])
    return _BASES[name]


def _guids(env: dict) -> list[str]:
    out = [env["uuid"]]
    for key in ("routes", "folders", "data", "callbacks"):
        for e in env.get(key, []):
            out.append(e["uuid"])
            out += [r["uuid"] for r in e.get("responses", [])]
    return out


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from([2**60 + 1, 1.0, 0.5, -0.0, 1e300]),
    st.text(max_size=5),
    st.sampled_from(["GET", "post", "", "200", "route", "folder", "{{x}}", "\ud800"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def pointer(draw, env: dict, containers: bool = False) -> str:
    """A JSON Pointer to something in `env` (to a container with `containers`)."""
    node, tokens = env, []
    while isinstance(node, dict | list) and node:
        if containers and not any(isinstance(v, dict | list) for v in _values(node)):
            break
        if tokens and draw(st.integers(0, 5)) == 0:
            break
        if isinstance(node, dict):
            keys = sorted(node)
            if containers:
                keys = [k for k in keys if isinstance(node[k], dict | list)]
            key = draw(st.sampled_from(keys))
        else:
            key = draw(st.integers(0, len(node) - 1))
        if containers and not isinstance(node[key], dict | list):
            break
        tokens.append(str(key).replace("~", "~0").replace("/", "~1"))
        node = node[key]
    return "".join("/" + t for t in tokens)


def _values(node):
    return node.values() if isinstance(node, dict) else node


@st.composite
def value_for(draw, env: dict):
    """Anything JSON, often something that looks like a part of an environment."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(_guids(env)))  # a duplicate uuid
    if kind == 1:
        target = draw(pointer(env, containers=True))
        return copy.deepcopy(jsonpatch.JsonPointer(target).resolve(env))  # a copied entity
    if kind == 2:
        return {
            "type": draw(st.sampled_from(["route", "folder"])),
            "uuid": draw(st.sampled_from(_guids(env))),
        }
    return draw(JSON)


@st.composite
def like(draw, current):
    """A value of the kind already there: mostly valid edits (an entity with a fresh uuid)."""
    if isinstance(current, bool):
        return draw(st.booleans())
    if isinstance(current, int | float):
        return draw(st.integers(0, 70000))
    if isinstance(current, str):
        return draw(st.text(max_size=5))
    value = copy.deepcopy(current)
    if isinstance(value, dict) and "uuid" in value:
        value["uuid"] = str(uuid.UUID(int=draw(st.integers(1, 2**128 - 1))))
        for response in value.get("responses", []):
            response["uuid"] = str(uuid.UUID(int=draw(st.integers(1, 2**128 - 1))))
    return value


@st.composite
def patches(draw):
    name = draw(st.sampled_from(FIXTURES))
    base = base_of(name)
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "replace", "add", "remove", "move", "copy"]))
        path = draw(pointer(base))
        if not path:
            continue
        op = {"op": kind, "path": path}
        if kind in ("replace", "add"):
            current = jsonpatch.JsonPointer(path).resolve(base)
            op["value"] = draw(st.one_of(value_for(base), like(current), like(current)))
            if kind == "add" and draw(st.booleans()):
                parent = path.rsplit("/", 1)[0]
                if isinstance(jsonpatch.JsonPointer(parent).resolve(base), list):
                    op["path"] = parent + "/-"
        elif kind in ("move", "copy"):
            op["from"] = draw(pointer(base))
            if not op["from"] or op["path"].startswith(op["from"] + "/"):
                continue
        ops.append(op)
    return name, ops


def _patched(base: dict, ops: list) -> dict:
    """As `env.patch` does it: on copies along the patch's paths, in place."""
    return patch_along(base, ops)


def _outcome(fn):
    try:
        return fn()
    except ModelError as exc:
        return ("refused", type(exc).__name__, exc.message)


@settings(**SETTINGS)
@given(patches())
def test_prepare_along_the_export_is_the_whole_prepare(case):
    name, ops = case
    base = base_of(name)
    before = copy.deepcopy(base)
    try:
        patched = _patched(base, ops)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError):
        return
    whole = _outcome(lambda: prepare(copy.deepcopy(patched), base["uuid"]))
    along = _outcome(lambda: prepare(patched, base["uuid"], base))
    if isinstance(whole, tuple) and whole[0] == "refused":
        assert along == whole
    else:
        assert not (isinstance(along, tuple) and along[0] == "refused"), along
        assert_strict_equal(along[0], whole[0])
        assert along[1] == whole[1]
        assert json.dumps(along[0]) == json.dumps(whole[0])  # key order too
    assert_strict_equal(base, before)  # the export is shared, never changed


L = {"uuid": "fa25abeb-29cd-4bc8-87b2-4cade442a27f"}  # a callback link without latency
EDITS = [
    ("databuckets.json", [{"op": "remove", "path": "/data/0/id"}]),
    ("databuckets.json", [{"op": "replace", "path": "/data/1/id", "value": 7}]),
    ("callbacks.json", [{"op": "remove", "path": "/callbacks/0/id"}]),
    ("callbacks.json", [{"op": "add", "path": "/routes/0/responses/0/callbacks/-", "value": L}]),
    ("callbacks.json", [{"op": "add", "path": "/routes/0/responses/0/callbacks/-", "value": {}}]),
    (
        "test-env.json",
        [{"op": "replace", "path": "/routes/1/responses/0/statusCode", "value": 1e6}],
    ),
    ("test-env.json", [{"op": "remove", "path": "/routes/1/responses/0/headers"}]),
    ("test-env.json", [{"op": "replace", "path": "/routes/0/responses/0/latency", "value": "5"}]),
    ("test-env.json", [{"op": "add", "path": "/routes/0/responses/-", "value": {"label": "x"}}]),
    ("test-env.json", [{"op": "replace", "path": "/routes/0/method", "value": "fetch"}]),
    ("test-env.json", [{"op": "move", "from": "/routes/0", "path": "/routes/2"}]),
    ("test-env.json", [{"op": "remove", "path": "/routes/1"}]),
    ("test-env.json", [{"op": "add", "path": "/rootChildren/-", "value": {"type": "route"}}]),
    ("test-env.json", [{"op": "replace", "path": "/lastMigration", "value": 34}]),
    ("test-env.json", [{"op": "remove", "path": "/port"}]),
    ("basic-folder-2-routes.json", [{"op": "replace", "path": "/folders/0/children", "value": []}]),
    ("basic-folder-2-routes.json", [{"op": "remove", "path": "/rootChildren/0"}]),
    ("basic-folder-2-routes.json", [{"op": "replace", "path": "/folders/0/name", "value": "f"}]),
]


@pytest.mark.parametrize(("name", "ops"), EDITS)
def test_edits_that_repair_or_refuse(name, ops):
    base = base_of(name)
    before = copy.deepcopy(base)
    whole = _outcome(lambda: prepare(copy.deepcopy(_patched(base, ops)), base["uuid"]))
    along = _outcome(lambda: prepare(_patched(base, ops), base["uuid"], base))
    assert type(along) is type(whole)
    if isinstance(whole, tuple) and whole[0] == "refused":
        assert along == whole
    else:
        assert_strict_equal(along[0], whole[0])
        assert along[1] == whole[1]
    assert_strict_equal(base, before)


@pytest.mark.parametrize("name", FIXTURES)
def test_what_a_patch_does_not_touch_stays_shared(name):
    base = base_of(name)
    if len(base["routes"]) < 2:
        pytest.skip("needs two routes")
    ops = [{"op": "replace", "path": "/routes/1/responses/0/label", "value": "x"}]
    prepared, notes = prepare(_patched(base, ops), base["uuid"], base)
    assert notes == []
    assert prepared["routes"][1]["responses"][0]["label"] == "x"
    assert prepared["routes"][0] is base["routes"][0]
    assert prepared["routes"][1]["responses"][0] is not base["routes"][1]["responses"][0]
    for key in ("folders", "data", "callbacks", "rootChildren", "headers"):
        assert prepared[key] is base[key]
    # a new route with a fresh uuid: the rest stays shared, the route is referenced
    new = {"uuid": "0b7c8d2e-1f3a-4b5c-9d6e-7f8a9b0c1d2e", "endpoint": "new"}
    ops = [{"op": "add", "path": "/routes/0", "value": new}]
    prepared, notes = prepare(_patched(base, ops), base["uuid"], base)
    whole, whole_notes = prepare(jsonpatch.apply_patch(copy.deepcopy(base), ops), base["uuid"])
    assert_strict_equal(prepared, whole)
    assert notes == whole_notes and any("added route" in n for n in notes)
    assert prepared["routes"][1] is base["routes"][0]
