"""Import/export of real Mockoon files: lossless round trips, repairs, bad input, hostile documents."""

import copy
import json

import pytest
from modelutil import (
    assert_strict_equal,
    assert_valid_environment,
    clone,
    fixture_names,
    load,
    refs_to,
    replicas,
    route_ids,
    strict_diff,
    sync_all,
)
from pycrdt import Array, Doc, Map

from peerdaemon.model import (
    LAST_MIGRATION,
    ModelError,
    NotAnEnvironment,
    apply_environment,
    check_environment,
    export_environment,
    import_environment,
    is_newer,
    prepare,
)

GENERATED = "demo-api-generated-commons-9.9.0.json"
REPAIRED = "demo-api-repaired-commons-9.9.0.json"
CLEAN = [n for n in fixture_names() if n != GENERATED]


def test_fixtures_are_there():
    names = fixture_names()
    assert GENERATED in names and REPAIRED in names and "incompatible.json" in names
    assert len(names) >= 8


def test_strict_equality_helper_tells_number_types_apart():
    assert strict_diff({"a": [1, 2.5, True]}, {"a": [1, 2.5, True]}) is None
    assert strict_diff(1, 1.0) and strict_diff(1, True) and strict_diff(0, False)
    assert strict_diff({"a": 1}, {"a": 1, "b": None}) and strict_diff([1, 2], [2, 1])


# ---------------------------------------------------------------------------------------------
# lossless round trips


@pytest.mark.parametrize("name", CLEAN)
def test_fixture_round_trip_is_lossless(name):
    env = load(name)
    doc, prepared, notes = import_environment(env)
    assert notes == []
    assert_strict_equal(prepared, env)
    exported = export_environment(doc)
    assert_strict_equal(exported, env)
    # the export is also what JSON.stringify of the original would write, key for key
    assert json.dumps(exported, sort_keys=True) == json.dumps(env, sort_keys=True)


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_round_trip_through_update_bytes(name):
    env = load(name)
    doc, prepared, _ = import_environment(env)
    update = doc.get_update()
    assert isinstance(update, bytes)
    fresh = Doc()
    fresh.apply_update(update)
    assert_strict_equal(export_environment(fresh), prepared)
    # and once more, from the fresh replica's own encoding
    third = Doc()
    third.apply_update(fresh.get_update())
    assert_strict_equal(export_environment(third), prepared)


@pytest.mark.parametrize("name", fixture_names())
def test_export_reimports_unchanged(name):
    doc, prepared, _ = import_environment(load(name))
    exported = export_environment(doc)
    doc2, prepared2, notes2 = import_environment(exported)
    assert notes2 == []
    assert_strict_equal(prepared2, exported)
    assert_strict_equal(export_environment(doc2), exported)


@pytest.mark.parametrize("name", [n for n in CLEAN if not is_newer(load(n))])
def test_fixture_is_valid_after_import(name):
    doc, _, _ = import_environment(load(name))
    assert_valid_environment(export_environment(doc))


def future_value(tag):
    """Unknown, nested, oddly typed JSON, as a future Mockoon might write it."""
    return {
        "tag": tag,
        "list": [
            {"a": 0.25, "b": [1, 2.5, None, True, False, -0.5], "c": "é😀 ünïcødé 漢字"},
            {"nested": {"deeper": [[], {}, [{"x": 1e-7}]]}},
            7,
            "str",
            None,
            [1, [2, [3]]],
        ],
        "max_safe": 9007199254740991,
        "min_safe": -9007199254740991,
        "2**53": 2**53,
        "ms": 1732262400000,
        "zero": 0,
        "negzero_float": -1.5,
        "float": 3.14159,
        "tiny": 5e-324,
        "huge_float": 1.7976931348623157e308,
        "exp_float": 1e21,  # JSON.stringify writes 1e+21: stays a float
        "true": True,
        "false": False,
        "null": None,
        "empty_string": "",
        "emoji 🔑 key": '👩‍👩‍👧‍👦 family, \u200b zero width, \n newline, \t tab, \\ backslash, " quote',
        "empty_obj": {},
        "empty_list": [],
    }


def with_future_fields(env):
    env = copy.deepcopy(env)
    env["x-future"] = future_value("env")
    env["tlsOptions"]["x-future"] = future_value("tls")
    env["headers"].append({"key": "X-New", "value": "v", "x-future": future_value("header")})
    env["data"][0]["x-future"] = future_value("data")
    env["data"][0]["documentation"] = None  # a Text key holding a non-string
    for i, r in enumerate(env["routes"]):
        r["x-future"] = future_value(f"route {i}")
        r["documentation"] = "docs é😀" if i % 2 else None
        for j, resp in enumerate(r["responses"]):
            resp["x-future"] = future_value(f"response {i}/{j}")
            resp["rules"].append(
                {"target": "body", "modifier": "a.b", "value": "ü", "x-future": [0.25, {"k": None}]}
            )
            resp["headers"].append({"key": "X-😀", "value": "é", "extra": 1.5})
            resp["callbacks"].append({"uuid": "cb-missing", "latency": 12, "x": 0.5})
        if i == 0:
            r["responses"][0]["body"] = None
        if i == 1:
            r["responses"][0]["statusCode"] = 200.5
    env["rootChildren"][0]["x-future"] = {"pinned": True, "weight": 0.25}
    env["x-future-list-of-entities"] = [{"uuid": "not-an-entity-list", "v": 1}]
    return env


def test_unknown_and_future_fields_are_preserved():
    env = with_future_fields(load("test-env.json"))
    doc, prepared, notes = import_environment(env)
    assert notes == []
    assert_strict_equal(prepared, env)
    assert_strict_equal(export_environment(doc), env)
    fresh = Doc()
    fresh.apply_update(doc.get_update())
    assert_strict_equal(export_environment(fresh), env)
    # a whole-file write of the same content changes nothing
    before = doc.get_update()
    apply_environment(doc, prepared)
    assert doc.get_update() == before


def test_unknown_fields_edited_in_place():
    env = with_future_fields(load("test-env.json"))
    doc, _, _ = import_environment(env)
    env["x-future"]["list"][0]["a"] = 0.5
    env["x-future"]["list"][0]["b"].insert(0, "new")
    env["x-future"]["list"].append({"added": [1.25]})
    env["routes"][3]["x-future"]["max_safe"] = 9007199254740990
    del env["routes"][4]["x-future"]["tiny"]
    env["routes"][5]["x-future"]["list"][3] = 7  # a string replaced by a number
    env["routes"][5]["x-future"]["list"][4] = {"was": "null"}
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    assert_strict_equal(export_environment(doc), env)
    assert_strict_equal(export_environment(clone(doc)), env)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ([1, 2], ["1", "2"]),  # numbers replaced by the same digits as strings
        (["true", "null"], [True, None]),
        ([{"a": 1}], ['{"a":1}']),  # an object replaced by its own JSON text
        ([1, 2], [1.5, 2]),
        ([True], [1]),
        ([0], [False]),
    ],
)
def test_list_items_of_another_type_are_replaced(old, new):
    env = load("test-env.json")
    env["x-list"] = old
    env["headers"] = [{"key": k, "value": k} for k in ("a", "b")]
    doc, _, _ = import_environment(env)
    env["x-list"] = new
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    assert_strict_equal(export_environment(doc)["x-list"], new)
    # the same through a list of per-item merged objects (headers) and the references list
    env["headers"] = [{"key": "a", "value": old[0]}] + env["headers"][1:]
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    env["headers"][0]["value"] = new[0]
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    assert_strict_equal(export_environment(doc), env)


def test_numbers_are_written_as_javascript_writes_them():
    env = load("test-env.json")
    env["x"] = {
        "int_as_float": 2.0,  # JSON.stringify(2.0) === "2"
        "big_int_as_float": 1e20,  # "100000000000000000000"
        "exp": 1e21,  # "1e+21"
        "exp_big": 1.5e300,
        "beyond_i64": 2**64,  # JavaScript reads it as 18446744073709551616 (a double)
        "beyond_double_ints": 10**30,  # JavaScript: 1e+30
        "negative_huge": -(10**25) - 1,
    }
    doc, prepared, _ = import_environment(env)
    out = export_environment(doc)["x"]
    assert_strict_equal(out["int_as_float"], 2)
    assert_strict_equal(out["big_int_as_float"], 10**20)
    assert_strict_equal(out["exp"], 1e21)
    assert_strict_equal(out["exp_big"], 1.5e300)
    assert_strict_equal(out["beyond_i64"], 2**64)
    assert_strict_equal(out["beyond_double_ints"], 1e30)
    assert_strict_equal(out["negative_huge"], -1e25)
    assert_strict_equal(export_environment(doc), prepared)  # the stored JSON is what exports
    # a replica decoding the update agrees, and re-applying the file changes nothing
    assert_strict_equal(export_environment(clone(doc))["x"], out)
    before = doc.get_update()
    apply_environment(doc, prepared)
    assert doc.get_update() == before


def test_non_finite_numbers_are_written_as_null():
    """Python's json reads NaN and Infinity; JSON.stringify writes them as null."""
    env = json.loads(json.dumps(load("test-env.json")))
    env["x"] = json.loads('{"nan": NaN, "inf": [Infinity, -Infinity], "huge": 1e999}')
    doc, prepared, _ = import_environment(env)
    out = export_environment(doc)
    assert_strict_equal(out["x"], {"nan": None, "inf": [None, None], "huge": None})
    assert_strict_equal(out, prepared)


def test_lone_surrogates_do_not_crash_and_become_replacement_characters():
    """JSON may escape half a UTF-16 pair; Yjs (TextEncoder) stores it as U+FFFD."""
    text = '{"name": "a\\ud800b", "body": "x\\udc00y😀", "key\\ud83d": "\\ud83d\\ude00"}'
    odd = json.loads(text)
    env = load("test-env.json")
    env["name"] = odd["name"]
    env["routes"][0]["responses"][0]["body"] = odd["body"]
    env["routes"][0]["documentation"] = odd["body"]
    env["x"] = odd
    doc, prepared, _ = import_environment(env)
    out = export_environment(doc)
    assert out["name"] == "a\ufffdb"
    assert out["routes"][0]["responses"][0]["body"] == "x\ufffdy😀"
    assert out["x"] == {"name": "a\ufffdb", "body": "x\ufffdy😀", "key\ufffd": "😀"}
    assert_strict_equal(out, prepared)
    # and as an edit of an existing text
    env["routes"][1]["responses"][0]["body"] = odd["body"] + "é"
    apply_environment(doc, prepare(env)[0])
    assert export_environment(doc)["routes"][1]["responses"][0]["body"] == "x\ufffdy😀é"


def test_big_ints_in_entities_and_lists():
    """Integers beyond 2**53 are what JavaScript makes of them, the same on every replica."""
    env = load("test-env.json")
    env["routes"][0]["responses"][0]["latency"] = 2**53 + 1
    env["routes"][0]["responses"][0]["headers"] = [{"key": "n", "value": 10**30}]
    env["routes"][0]["x"] = [2**70, {"y": 2**64 + 1}, 2**63 - 1, {"z": 2**63 - 1}]
    env["routes"][0]["y"] = 2**63 - 1
    env["routes"][0]["ok"] = [2**53, -(2**53), 2**53 - 1]
    doc, prepared, _ = import_environment(env)
    out = export_environment(doc)
    assert_strict_equal(out, prepared)
    assert_strict_equal(export_environment(clone(doc)), out)
    assert_strict_equal(out["routes"][0]["ok"], [2**53, -(2**53), 2**53 - 1])
    assert_strict_equal(out["routes"][0]["y"], 2**63)
    assert_strict_equal(out["routes"][0]["x"][2:], [2**63, {"z": 2**63}])
    assert_strict_equal(out["routes"][0]["responses"][0]["latency"], 2**53)
    assert_strict_equal(out["routes"][0]["responses"][0]["headers"][0]["value"], 1e30)
    assert_strict_equal(out["routes"][0]["x"][:2], [1.1805916207174113e21, {"y": 2**64}])


# ---------------------------------------------------------------------------------------------
# newer and older files


def test_incompatible_file_is_kept_exactly_and_flagged():
    env = load("incompatible.json")
    assert env["lastMigration"] > LAST_MIGRATION
    assert is_newer(env)
    doc, prepared, notes = import_environment(env)
    assert notes == []
    assert_strict_equal(prepared, env)
    out = export_environment(doc)
    assert_strict_equal(out, env)
    assert is_newer(out)
    # it has neither folders, rootChildren, data nor callbacks: none is added
    assert "rootChildren" not in out and "folders" not in out and "data" not in out
    # statusCode "200" (a string) is not "fixed", the route keeps its missing fields
    assert out["routes"][0]["responses"][0]["statusCode"] == "200"
    assert_strict_equal(export_environment(clone(doc)), env)


def test_newer_file_is_not_repaired():
    env = load("incompatible.json")
    env["rootChildren"] = [
        {"type": "route", "uuid": "missing"},
        {"type": "route", "uuid": env["routes"][0]["uuid"]},
        {"type": "route", "uuid": env["routes"][0]["uuid"]},
        {"type": "future-kind", "uuid": "x"},
    ]
    env["folders"] = [{"uuid": "f1", "name": "no children key"}]
    env["routes"][0]["x-new"] = {"a": [0.25]}
    doc, prepared, notes = import_environment(env)
    assert notes == []
    assert_strict_equal(export_environment(doc), env)
    assert is_newer(export_environment(doc))


def _newer_odd_but_storable(env):
    env["routes"][0]["responses"].append({"uuid": "r2", "future": [{"a": 0.25}]})
    env["routes"].append({"uuid": "no-responses", "endpoint": "e"})
    env["routes"].append({"uuid": "responses-string", "responses": "later"})
    env["routes"].append({"uuid": "responses-null", "responses": None, "documentation": 5})
    env["folders"] = [{"uuid": "f", "children": "not yet"}, {"uuid": "g"}]
    env["rootChildren"] = ["a string", 5, None, {"type": "route"}]


def test_newer_file_with_odd_shapes_is_stored_as_it_is():
    env = load("incompatible.json")
    _newer_odd_but_storable(env)
    doc, prepared, notes = import_environment(env)
    assert notes == []
    assert_strict_equal(prepared, env)
    assert_strict_equal(export_environment(doc), env)
    assert_strict_equal(export_environment(clone(doc)), env)


def test_same_odd_shapes_in_a_current_file_are_repaired():
    env = load("incompatible.json")
    env["lastMigration"] = LAST_MIGRATION
    _newer_odd_but_storable(env)
    doc, prepared, notes = import_environment(env)
    assert notes
    out = export_environment(doc)
    assert_strict_equal(out, prepared)
    assert_valid_environment(out)
    assert [r["responses"] for r in out["routes"][1:]] == [[], [], []]


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e["routes"].append({"endpoint": "no uuid"}),
        lambda e: e["routes"].append(copy.deepcopy(e["routes"][0])),
        lambda e: e["routes"].append(5),
        lambda e: e["routes"][0]["responses"].append({"body": "no uuid"}),
        lambda e: e["routes"][0].__setitem__("responses", {"a": {"uuid": "a"}}),
        lambda e: e.__setitem__("folders", {"a": 1}),
        lambda e: e.__setitem__("data", [{"uuid": ""}]),
        lambda e: e.__setitem__("rootChildren", "x"),
    ],
    ids=[
        "no-uuid",
        "dup-uuid",
        "number",
        "response-no-uuid",
        "responses-object",
        "folders-object",
        "empty-uuid",
        "rootChildren-string",
    ],
)
def test_newer_file_that_cannot_be_stored_as_it_is_is_refused(change):
    """Not a crash (KeyError, TypeError) nor a silent loss: a ModelError the API can report."""
    env = load("incompatible.json")
    change(env)
    with pytest.raises(ModelError) as info:
        import_environment(env)
    assert info.value.code == "bad-request"
    # a current file with the same shapes is repaired instead
    env["lastMigration"] = LAST_MIGRATION
    doc, prepared, notes = import_environment(env)
    assert notes
    assert_valid_environment(export_environment(doc))


def test_older_file_is_kept_as_it_is():
    env = load("basic-folder-2-routes.json")
    assert env["lastMigration"] == 32
    doc, _, notes = import_environment(env)
    assert notes == []
    out = export_environment(doc)
    assert_strict_equal(out, env)
    assert "streamingMode" not in out["routes"][0]  # no migration, no new defaults
    assert not is_newer(out)


def test_absent_lists_stay_absent_until_something_is_added():
    env = load("incompatible.json")
    env["lastMigration"] = 20
    doc, _, _ = import_environment(env)
    out = export_environment(doc)
    assert_strict_equal(out, env)
    env["data"] = [{"uuid": "d1", "id": "abcd", "name": "n", "documentation": "", "value": "[]"}]
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    assert_strict_equal(export_environment(doc), env)
    del env["data"]
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    assert_strict_equal(export_environment(doc), env)


# ---------------------------------------------------------------------------------------------
# repairs on import


def test_generated_demo_is_repaired_like_mockoon():
    generated, repaired = load(GENERATED), load(REPAIRED)
    assert "uuid" not in generated["routes"][6]
    doc, prepared, notes = import_environment(generated)
    new_uuid = prepared["routes"][6]["uuid"]
    assert isinstance(new_uuid, str) and len(new_uuid) == 36
    assert new_uuid not in json.dumps(generated)
    expected = json.loads(json.dumps(repaired).replace(repaired["routes"][6]["uuid"], new_uuid))
    assert_strict_equal(prepared, expected)
    assert_strict_equal(export_environment(doc), expected)
    assert_valid_environment(expected)
    text = "\n".join(notes)
    assert "routes[6]" in text and "forward-and-record" in text and "had no uuid" in text
    assert new_uuid in text and "rootChildren" in text
    assert len(notes) == 2
    # the input was not modified
    assert "uuid" not in generated["routes"][6]


def test_duplicate_and_malformed_entities_are_repaired_with_notes():
    env = load("test-env.json")
    dup = copy.deepcopy(env["routes"][1])
    dup["endpoint"] = "dup"
    env["routes"].append(dup)
    env["routes"].insert(0, 5)
    env["routes"][2]["responses"].append(copy.deepcopy(env["routes"][2]["responses"][0]))
    env["rootChildren"].append({"type": "route", "uuid": "missing"})
    env["rootChildren"].append(env["rootChildren"][0])
    doc, prepared, notes = import_environment(env)
    text = "\n".join(notes)
    assert "duplicate uuid" in text and "not an object" in text and "missing" in text
    assert len(prepared["routes"]) == 12
    out = export_environment(doc)
    assert_valid_environment(out)
    assert_strict_equal(out, prepared)
    assert [r["endpoint"] for r in out["routes"]][-1] == "dup"
    assert len(out["routes"][1]["responses"]) == 2


def test_env_id_wins_over_the_file_uuid():
    env = load("test-env.json")
    doc, prepared, notes = import_environment(env, env_id="my-id")
    assert prepared["uuid"] == "my-id"
    assert any("my-id" in n for n in notes)
    assert export_environment(doc)["uuid"] == "my-id"
    assert export_environment(doc, env_id="other")["uuid"] == "other"


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "an environment",
        5,
        None,
        True,
        [{"uuid": "u", "lastMigration": 33}],
        {},
        {"name": "no uuid nor lastMigration", "routes": []},
        {"uuid": 5, "name": "uuid is a number"},
        {"uuid": "", "lastMigration": 33},
        {"uuid": "u", "lastMigration": "33"},
        {"uuid": "u", "lastMigration": True},
        {"uuid": "u", "routes": {}},
        {"uuid": "u", "lastMigration": 33, "routes": "none"},
        {"lastMigration": 33, "routes": 5},
    ],
)
def test_bad_input_is_not_an_environment(bad):
    with pytest.raises(NotAnEnvironment) as info:
        import_environment(bad)
    assert info.value.code == "not-an-environment"
    assert isinstance(info.value, ValueError)
    with pytest.raises(NotAnEnvironment):
        prepare(bad)
    with pytest.raises(NotAnEnvironment):
        check_environment(bad)


def test_minimal_environments_are_accepted():
    for env in ({"uuid": "u"}, {"lastMigration": 33}):
        doc, prepared, _ = import_environment(env)
        out = export_environment(doc)
        assert_valid_environment(out)
        assert_strict_equal(out, prepared)


# ---------------------------------------------------------------------------------------------
# hostile documents: any Yjs client can write anything; export must still be a valid environment


def _route_map(doc, uid):
    return doc.get("routes", type=Map)[uid]


def _set_route_to_number(doc, env):
    doc.get("routes", type=Map)[env["routes"][2]["uuid"]] = 5


def _set_route_to_list(doc, env):
    doc.get("routes", type=Map)[env["routes"][3]["uuid"]] = Array([1, 2])


def _responses_to_string(doc, env):
    _route_map(doc, env["routes"][1]["uuid"])["responses"] = "not responses"


def _responses_to_plain_list(doc, env):
    r = env["routes"][1]
    _route_map(doc, r["uuid"])["responses"] = Array([Map({"label": "no uuid"}), 7])


def _response_to_number(doc, env):
    r = env["routes"][1]
    _route_map(doc, r["uuid"])["responses"][r["responses"][0]["uuid"]] = 42


def _responses_order_garbage(doc, env):
    r = env["routes"][1]
    order = _route_map(doc, r["uuid"])["responses.order"]
    order.append(5)
    order.append("missing")
    order.insert(0, None)
    order.append(r["responses"][0]["uuid"])


def _root_children_garbage(doc, env):
    refs = doc.get("rootChildren", type=Array)
    for junk in (
        5,
        "route",
        None,
        [1, 2],
        {"type": "route", "uuid": "missing"},
        {"type": "folder", "uuid": env["routes"][0]["uuid"]},
        {"type": "route"},
        {"uuid": env["routes"][0]["uuid"]},
        {"type": "route", "uuid": 12},
        dict(env["rootChildren"][3]),
    ):
        refs.append(junk)
    refs.insert(0, {"type": "nonsense", "uuid": "x"})


def _routes_order_garbage(doc, env):
    order = doc.get("routes.order", type=Array)
    order.append(7)
    order.append(None)
    order.append("missing")
    order.append({"uuid": env["routes"][0]["uuid"]})
    order.append(env["routes"][0]["uuid"])


def _routes_order_emptied(doc, env):
    order = doc.get("routes.order", type=Array)
    del order[0 : len(order)]


def _environment_keys_deleted(doc, env):
    m = doc.get("environment", type=Map)
    for key in list(m.keys()):
        del m[key]


def _meta_garbage(doc, env):
    meta = doc.get("meta", type=Map)
    meta["absent"] = ["routes", "rootChildren", "folders", 5]
    meta["model"] = "x"


def _meta_absent_not_a_list(doc, env):
    doc.get("meta", type=Map)["absent"] = 5


def _folder_garbage(doc, env):
    folders = doc.get("folders", type=Map)
    folders["f1"] = Map({"name": "children not a list", "children": "nope"})
    folders["f2"] = Map({"name": "cycle", "children": Array([{"type": "folder", "uuid": "f2"}])})
    folders["f3"] = 17
    refs = doc.get("rootChildren", type=Array)
    refs.append({"type": "folder", "uuid": "f3"})
    refs.append({"type": "folder", "uuid": "f2"})


def _route_uuid_mismatch(doc, env):
    _route_map(doc, env["routes"][0]["uuid"])["uuid"] = "a-different-uuid"


def _body_to_number(doc, env):
    r = env["routes"][1]
    _route_map(doc, r["uuid"])["responses"][r["responses"][0]["uuid"]]["body"] = 5


def _empty_uuid_keys(doc, env):
    """An entity under the key "" has no uuid: repairing it would mean a random uuid."""
    r = env["routes"][1]
    doc.get("routes", type=Map)[""] = Map({"endpoint": "no uuid", "responses": Map()})
    doc.get("routes.order", type=Array).append("")
    _route_map(doc, r["uuid"])["responses"][""] = Map({"label": "no uuid"})
    doc.get("folders", type=Map)[""] = Map({"name": "no uuid", "children": Array()})
    doc.get("rootChildren", type=Array).append({"type": "folder", "uuid": ""})


HOSTILE = [
    _set_route_to_number,
    _set_route_to_list,
    _responses_to_string,
    _responses_to_plain_list,
    _response_to_number,
    _responses_order_garbage,
    _root_children_garbage,
    _routes_order_garbage,
    _routes_order_emptied,
    _environment_keys_deleted,
    _meta_garbage,
    _meta_absent_not_a_list,
    _folder_garbage,
    _route_uuid_mismatch,
    _body_to_number,
    _empty_uuid_keys,
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=[f.__name__.strip("_") for f in HOSTILE])
def test_hostile_update_still_exports_a_valid_environment(hostile):
    env = load("test-env.json")
    a, b, c = replicas(env, 3)
    with b.transaction():
        hostile(b, env)
    # what reaches A and C is a well-formed Yjs update; all export the same (no random repair)
    a.apply_update(b.get_update(a.get_state()))
    c.apply_update(b.get_update(c.get_state()))
    out_a = export_environment(a, env_id=env["uuid"])
    out_b = export_environment(b, env_id=env["uuid"])
    assert_strict_equal(out_a, out_b)
    assert_strict_equal(export_environment(c, env_id=env["uuid"]), out_a)
    assert_valid_environment(out_a)
    check_environment(out_a)
    assert out_a["uuid"] == env["uuid"]
    # export is stable, and what it exports imports without any repair
    assert_strict_equal(export_environment(a, env_id=env["uuid"]), out_a)
    _, prepared, notes = import_environment(out_a)
    assert notes == []
    assert_strict_equal(prepared, out_a)
    # a whole-file write of the good environment heals the document
    prepared, _ = prepare(env)
    apply_environment(a, prepared)
    assert_strict_equal(export_environment(a), env)
    sync_all(a, b)
    assert_strict_equal(export_environment(b), env)


def test_hostile_specific_outcomes():
    env = load("test-env.json")
    ids = route_ids(env)

    a, b = replicas(env)
    _set_route_to_number(b, env)
    out = export_environment(b)
    assert route_ids(out) == ids[:2] + ids[3:]
    assert refs_to(out, ids[2]) == []

    a, b = replicas(env)
    _responses_to_string(b, env)
    assert export_environment(b)["routes"][1]["responses"] == []

    a, b = replicas(env)
    _root_children_garbage(b, env)
    _routes_order_garbage(b, env)
    out = export_environment(b)
    assert_strict_equal(out["rootChildren"], env["rootChildren"])
    assert route_ids(out) == ids

    a, b = replicas(env)
    _routes_order_emptied(b, env)
    assert route_ids(export_environment(b)) == sorted(ids)  # missing from the order: by uuid

    a, b = replicas(env)
    _route_uuid_mismatch(b, env)
    assert route_ids(export_environment(b)) == ids  # the map key is the uuid

    a, b = replicas(env)
    _environment_keys_deleted(b, env)
    out = export_environment(b, env_id=env["uuid"])
    assert route_ids(out) == ids and out["uuid"] == env["uuid"]


def test_hostile_plain_list_entities_export_the_same_everywhere():
    """Entities without uuids that a client wrote must not get random uuids on export."""
    env = load("test-env.json")
    a, b, c = replicas(env, 3)
    _responses_to_plain_list(b, env)
    sync_all(a, b, c)
    outs = [export_environment(d) for d in (a, b, c)]
    for out in outs[1:]:
        assert_strict_equal(out, outs[0])
    assert_strict_equal(export_environment(a), outs[0])
    assert_valid_environment(outs[0])
