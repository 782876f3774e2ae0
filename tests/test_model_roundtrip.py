"""Import/export of real Mockoon files: lossless round trips, repairs, bad input, hostile documents."""

import copy
import json
import uuid

import pytest
from modelutil import (
    assert_kept_with_defaults,
    assert_mockoon_strict,
    assert_strict_equal,
    assert_valid_environment,
    clone,
    edit,
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
CB_MISSING = "cb000000-0000-4000-8000-000000000000"  # a callback link to no callback: kept
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


VALID = ["demo-api-repaired-commons-9.9.0.json", "response-rules.json", "test-env.json"]
"""Fixtures Mockoon's strict schema accepts as they are; the others lack fields (older files,
`documentation` of data buckets and callbacks), or are from a newer Mockoon."""


@pytest.mark.parametrize("name", VALID)
def test_valid_fixture_round_trip_is_lossless(name):
    env = load(name)
    assert_mockoon_strict(env)
    doc, prepared, notes = import_environment(env)
    assert notes == []
    assert_strict_equal(prepared, env)
    exported = export_environment(doc)
    assert_strict_equal(exported, env)
    # the export is also what JSON.stringify of the original would write, key for key
    assert json.dumps(exported, sort_keys=True) == json.dumps(env, sort_keys=True)


@pytest.mark.parametrize("name", [n for n in CLEAN if n not in VALID and not is_newer(load(n))])
def test_fixture_missing_fields_get_mockoon_defaults(name):
    """As Mockoon's loader does: everything the file holds is kept, missing fields are added."""
    env = load(name)
    with pytest.raises(AssertionError):
        assert_mockoon_strict(env)
    doc, prepared, notes = import_environment(env)
    assert notes == []  # a missing field is no repair worth a note: Mockoon adds it silently
    assert_kept_with_defaults(env, prepared)
    assert_strict_equal(export_environment(doc), prepared)


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
    env["data"][0]["x-text"] = None
    for i, r in enumerate(env["routes"]):
        r["x-future"] = future_value(f"route {i}")
        r["documentation"] = "docs é😀" if i % 2 else ""
        for j, resp in enumerate(r["responses"]):
            resp["x-future"] = future_value(f"response {i}/{j}")
            resp["rules"].append(
                {
                    "target": "body",
                    "modifier": "a.b",
                    "value": "ü",
                    "invert": False,
                    "operator": "regex",
                    "x-future": [0.25, {"k": None}],
                }
            )
            resp["headers"].append({"key": "X-😀", "value": "é", "extra": 1.5})
            resp["callbacks"].append({"uuid": CB_MISSING, "latency": 12, "x": 0.5})
        if i == 0:
            r["responses"][0]["body"] = ""
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
    # the same in a list of per-item merged objects (headers)
    env["headers"] = [{"key": "a", "value": "a", "x": old[0]}] + env["headers"][1:]
    prepared, _ = prepare(env)
    apply_environment(doc, prepared)
    env["headers"][0]["x"] = new[0]
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
    env["routes"][0]["responses"][0]["x-latency"] = 2**53 + 1
    env["routes"][0]["responses"][0]["headers"] = [{"key": "n", "value": "", "n": 10**30}]
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
    assert_strict_equal(out["routes"][0]["responses"][0]["x-latency"], 2**53)
    assert_strict_equal(out["routes"][0]["responses"][0]["headers"][0]["n"], 1e30)
    assert_strict_equal(out["routes"][0]["x"][:2], [1.1805916207174113e21, {"y": 2**64}])


# ---------------------------------------------------------------------------------------------
# newer and older files


def test_incompatible_file_is_flagged_and_made_valid():
    """A file from a newer Mockoon is not refused: repaired like a merge, with notes."""
    env = load("incompatible.json")
    assert env["lastMigration"] > LAST_MIGRATION
    assert is_newer(env)
    doc, prepared, notes = import_environment(env)
    # statusCode "200" is converted, as Mockoon's Joi schema converts it
    assert notes == [
        "/routes/0/responses/0/statusCode: '200' made a number",
        f"/rootChildren: added route {env['routes'][0]['uuid']} that no folder held",
    ]
    assert prepared["routes"][0]["responses"][0]["statusCode"] == 200
    env["routes"][0]["responses"][0]["statusCode"] = 200
    assert_kept_with_defaults(env, prepared)  # everything else kept, missing fields added
    assert prepared["routes"][0]["enabled"] is True and prepared["https"] is False  # unknown
    out = export_environment(doc)
    assert_strict_equal(out, prepared)
    assert is_newer(out)
    assert_strict_equal(export_environment(clone(doc)), out)


MISSING = "00000000-0000-4000-8000-00000000dead"
F1, F2 = "f1000000-0000-4000-8000-000000000001", "f2000000-0000-4000-8000-000000000002"


def test_newer_file_gets_the_same_reference_repairs():
    env = load("incompatible.json")
    rid = env["routes"][0]["uuid"]
    env["rootChildren"] = [
        {"type": "route", "uuid": MISSING},
        {"type": "route", "uuid": rid},
        {"type": "route", "uuid": rid},
        {"type": "future-kind", "uuid": "x"},
    ]
    env["folders"] = [{"uuid": F1, "name": "no children key"}]
    env["routes"][0]["x-new"] = {"a": [0.25]}
    doc, prepared, notes = import_environment(env)
    text = "\n".join(notes)
    assert "missing route" in text and "second reference" in text and "future-kind" in text
    out = export_environment(doc)
    assert_strict_equal(out, prepared)
    assert_mockoon_strict(out)
    assert out["rootChildren"] == [{"type": "route", "uuid": rid}, {"type": "folder", "uuid": F1}]
    assert out["folders"] == [{"uuid": F1, "name": "no children key", "children": []}]
    assert out["routes"][0]["x-new"] == {"a": [0.25]}
    assert is_newer(out)


def _odd_shapes(env):
    env["routes"][0]["responses"].append({"uuid": "r2", "future": [{"a": 0.25}]})
    env["routes"].append({"uuid": "no-responses", "endpoint": "e"})
    env["routes"].append({"uuid": "responses-string", "responses": "later"})
    env["routes"].append({"uuid": "responses-null", "responses": None, "documentation": 5})
    env["folders"] = [{"uuid": F1, "children": "not yet"}, {"uuid": F2}]
    env["rootChildren"] = ["a string", 5, None, {"type": "route"}]


def test_newer_file_with_odd_shapes_is_repaired_with_notes():
    env = load("incompatible.json")
    _odd_shapes(env)
    doc, prepared, notes = import_environment(env)
    text = "\n".join(notes)
    assert "/routes/2/responses: 'later' is not a list; emptied" in text
    assert "/routes/3/documentation: 5 is not a string" in text
    assert "/folders/0/children: 'not yet' is not a list" in text
    assert "/rootChildren/0: dropped 'a string'" in text
    out = export_environment(doc)
    assert_strict_equal(out, prepared)
    assert_mockoon_strict(out)
    assert [r["responses"] for r in out["routes"][1:]] == [[], [], []]
    assert out["routes"][0]["responses"][1]["future"] == [{"a": 0.25}]
    assert_strict_equal(export_environment(clone(doc)), out)


def test_same_odd_shapes_in_a_current_file_are_refused_with_their_pointer():
    env = load("incompatible.json")
    env["lastMigration"] = LAST_MIGRATION
    env["routes"][0]["responses"][0]["statusCode"] = 200
    _odd_shapes(env)
    steps = [
        ("/routes/2/responses must be a list", lambda: env["routes"][2].update(responses=[])),
        ("/routes/3/responses must be a list", lambda: env["routes"][3].update(responses=[])),
        ("/routes/3/documentation must be a string", lambda: env["routes"][3].pop("documentation")),
        ("/folders/0/children must be a list", lambda: env["folders"][0].update(children=[])),
        ("/rootChildren/0 must be an object", lambda: env.update(rootChildren=[{"type": "route"}])),
        ("/rootChildren/0 must be a {type, uuid} reference", lambda: env.update(rootChildren=[])),
    ]
    for message, fix in steps:
        with pytest.raises(ModelError) as info:
            import_environment(env)
        assert info.value.message.startswith(message)
        fix()
    doc, prepared, notes = import_environment(env)
    assert_mockoon_strict(prepared)
    assert_strict_equal(export_environment(doc), prepared)
    assert "uuid that is no GUID r2" in "\n".join(notes)


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        (lambda e: e["routes"].append({"endpoint": "no uuid"}), None),
        (lambda e: e["routes"].append(copy.deepcopy(e["routes"][0])), None),
        (lambda e: e["routes"].append(5), "/routes/1 must be an object (a route)"),
        (lambda e: e["routes"][0]["responses"].append({"body": "no uuid"}), None),
        (
            lambda e: e["routes"][0].__setitem__("responses", {"a": {"uuid": "a"}}),
            "/routes/0/responses must be a list",
        ),
        (lambda e: e.__setitem__("folders", {"a": 1}), "/folders must be a list"),
        (lambda e: e.__setitem__("data", [{"uuid": ""}]), None),
        (lambda e: e.__setitem__("rootChildren", "x"), "/rootChildren must be a list"),
        (lambda e: e.__setitem__("port", "3000"), "/port must be a number from 0 to 65535"),
        (lambda e: e.__setitem__("tlsOptions", []), "/tlsOptions must be an object"),
        (
            lambda e: e["routes"][0]["responses"][0].__setitem__("headers", "x"),
            "/routes/0/responses/0/headers must be a list",
        ),
        (
            lambda e: e["routes"][0]["responses"][0]["headers"].append("x"),
            "/routes/0/responses/0/headers/1 must be an object (a header)",
        ),
        (lambda e: e.__setitem__("cors", 1), "/cors must be true or false"),
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
        "string-port",
        "tls-list",
        "headers-string",
        "header-string",
        "cors-number",
    ],
)
def test_wrong_types_are_refused_in_current_files_and_repaired_in_newer_ones(change, refused):
    """Not a crash (KeyError, TypeError) nor a silent loss: a ModelError naming the field."""
    env = load("incompatible.json")
    env["routes"][0]["responses"][0]["statusCode"] = 200
    change(env)
    # from a newer Mockoon: repaired, with notes
    doc, prepared, notes = import_environment(env)
    assert notes
    assert_mockoon_strict(export_environment(doc))
    assert_strict_equal(export_environment(doc), prepared)
    # a current file with the same shapes is refused, or repaired if Mockoon's loader would
    env["lastMigration"] = LAST_MIGRATION
    if refused is None:
        doc, prepared, notes = import_environment(env)
        assert notes
        assert_mockoon_strict(export_environment(doc))
    else:
        with pytest.raises(ModelError) as info:
            import_environment(env)
        assert info.value.code == "bad-request"
        assert info.value.message == refused


def test_older_file_gets_defaults_but_no_migration():
    env = load("basic-folder-2-routes.json")
    assert env["lastMigration"] == 32
    doc, _, notes = import_environment(env)
    assert notes == []
    out = export_environment(doc)
    assert_kept_with_defaults(env, out)
    assert out["lastMigration"] == 32  # migrations are Mockoon's job
    assert out["routes"][0]["streamingMode"] is None  # Mockoon's default for a missing field
    assert out["routes"][0]["streamingInterval"] == 0
    assert not is_newer(out)


def test_required_lists_are_always_present():
    """Once, a file without `folders` exported without it (meta.absent): invalid."""
    env = load("incompatible.json")
    env["lastMigration"] = 20
    env["routes"][0]["responses"][0]["statusCode"] = 200
    doc, prepared, _ = import_environment(env)
    out = export_environment(doc)
    for key in ("folders", "rootChildren", "data", "callbacks", "routes"):
        assert isinstance(out[key], list)
    assert_strict_equal(out, prepared)
    assert_mockoon_strict(out)
    assert "absent" not in doc.get("meta", type=Map)


def test_meta_absent_written_by_a_client_drops_no_required_list():
    """Old code, or any client, may list required lists in meta.absent: they stay."""
    env = load("test-env.json")
    a, b = replicas(env)
    absent = ["routes", "folders", "rootChildren", "data", "callbacks", 5]
    b.get("meta", type=Map)["absent"] = absent
    a.apply_update(b.get_update(a.get_state()))
    out = export_environment(a, env_id=env["uuid"])
    assert_strict_equal(out, env)
    assert_mockoon_strict(out)
    # and the environment stays editable
    edited = edit(a, lambda e: e.__setitem__("name", "edited"))
    assert edited["name"] == "edited" and edited["routes"] == env["routes"]
    assert "absent" not in a.get("meta", type=Map)


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
    assert_mockoon_strict(expected)
    text = "\n".join(notes)
    assert "/routes/6" in text and "forward-and-record" in text and "had no uuid" in text
    assert new_uuid in text and "rootChildren" in text
    assert len(notes) == 2
    # the input was not modified, and the new uuid is the same on every import
    assert "uuid" not in generated["routes"][6]
    assert import_environment(generated)[1]["routes"][6]["uuid"] == new_uuid


def test_duplicate_and_malformed_entities_are_repaired_with_notes():
    env = load("test-env.json")
    dup = copy.deepcopy(env["routes"][1])
    dup["endpoint"] = "dup"
    env["routes"].append(dup)
    env["routes"][1]["responses"].append(copy.deepcopy(env["routes"][1]["responses"][0]))
    env["rootChildren"].append({"type": "route", "uuid": MISSING})
    env["rootChildren"].append(env["rootChildren"][0])
    doc, prepared, notes = import_environment(env)
    text = "\n".join(notes)
    assert "duplicate uuid" in text and "missing" in text and "second reference" in text
    assert len(prepared["routes"]) == 12
    out = export_environment(doc)
    assert_mockoon_strict(out)
    assert_strict_equal(out, prepared)
    assert [r["endpoint"] for r in out["routes"]][-1] == "dup"
    assert len(out["routes"][1]["responses"]) == 2
    # ...but a route that is no object is refused
    env["routes"].insert(0, 5)
    with pytest.raises(ModelError, match="^/routes/0 must be an object"):
        import_environment(env)


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


# ---------------------------------------------------------------------------------------------
# Content no environment can hold, merged from any Yjs client. Each case
# crashed the export, or exported what Mockoon's strict schema refuses, before the fix.


# A Yjs update (npm yjs 13.6) that sets the environment's `port` to a Y.XmlElement('p') holding a
# Y.XmlText, and its `name` to a Y.XmlText: pycrdt cannot write these into a map itself. It has no
# dependencies, so it applies to any document, and its client id (2**53 - 1) is above any other:
# it wins over the values a concurrent write put there.
XML_ELEMENT_UPDATE = bytes.fromhex(
    "0105ffffffffffffff0f0027010b656e7669726f6e6d656e7404706f72740301700700ffffffffffffff0f0006"
    "0400ffffffffffffff0f0102686927010b656e7669726f6e6d656e74046e616d65060400ffffffffffffff0f04"
    "02787400"
)
GUID_A = "aaaaaaaa-0000-4000-8000-000000000001"


def _env_map(doc):
    return doc.get("environment", type=Map)


def _response_map(doc, env, i=1, j=0):
    r = env["routes"][i]
    return _route_map(doc, r["uuid"])["responses"][r["responses"][j]["uuid"]]


def _xml_fragments(doc, env):
    from pycrdt import XmlElement, XmlFragment, XmlText

    _env_map(doc)["x-xml"] = XmlFragment([XmlElement("p", {"a": "b"}, [XmlText("hi")])])
    _env_map(doc)["hostname"] = XmlFragment()
    _route_map(doc, env["routes"][0]["uuid"])["endpoint"] = XmlFragment([XmlText("t")])
    _response_map(doc, env)["x"] = Array([XmlFragment(), 1])


def _xml_element(doc, env):
    doc.apply_update(XML_ELEMENT_UPDATE)
    with doc.transaction() as t:  # it did land as an XmlElement and an XmlText
        raw = _env_map(doc).integrated
        assert [type(raw.get(t._txn, k)).__name__ for k in ("port", "name")] == [
            "XmlElement",
            "XmlText",
        ]


def _deep_maps(doc, env):
    for parent in (_env_map(doc), _route_map(doc, env["routes"][0]["uuid"])):
        m = parent
        for _ in range(1_200):
            m["d"] = Map()
            m = m["d"]
    arr = _response_map(doc, env)["x-deep"] = Array()
    for _ in range(1_200):
        arr.append(Array())
        arr = arr[0]


def _sub_documents(doc, env):
    _env_map(doc)["x-doc"] = Doc()
    _env_map(doc)["name"] = Doc()
    _route_map(doc, env["routes"][0]["uuid"])["responses"][GUID_A] = Doc()
    _response_map(doc, env)["x-bytes"] = b"\x00\xff"


def _non_finite(doc, env):
    _env_map(doc)["latency"] = float("nan")
    _env_map(doc)["x-inf"] = [float("inf"), {"n": float("-inf")}]
    _response_map(doc, env)["latency"] = float("inf")
    _response_map(doc, env)["statusCode"] = float("nan")


def _wrong_types(doc, env):
    _env_map(doc)["port"] = "3001"
    _env_map(doc)["headers"] = "x"
    _env_map(doc)["cors"] = "yes"
    _env_map(doc)["tlsOptions"] = Array([1])
    _response_map(doc, env)["statusCode"] = "404"
    _response_map(doc, env)["headers"] = "x"
    _response_map(doc, env)["rules"] = Array(["x", Map({"target": "nope", "invert": 1})])


def _response_without_fields(doc, env):
    r = env["routes"][1]
    route_map = _route_map(doc, r["uuid"])
    route_map["responses"][GUID_A] = Map({"label": "added through Yjs"})
    route_map["responses.order"].append(GUID_A)
    doc.get("routes", type=Map)[GUID_A.replace("a", "b")] = Map({"endpoint": "bare"})
    doc.get("folders", type=Map)[GUID_A.replace("a", "c")] = Map()
    doc.get("data", type=Map)[GUID_A.replace("a", "d")] = Map({"name": "bucket"})


def _last_migration_string(doc, env):
    _env_map(doc)["lastMigration"] = "33"


def _last_migration_newer_dangling(doc, env):
    _env_map(doc)["lastMigration"] = 99999
    doc.get("rootChildren", type=Array).append({"type": "route", "uuid": MISSING})


def _duplicate_uuids(doc, env):
    routes = doc.get("routes", type=Map)
    first_route = env["routes"][0]["uuid"]
    shared = env["routes"][2]["responses"][0]["uuid"]
    # a response under a route's uuid, and one response uuid in two routes
    _route_map(doc, env["routes"][1]["uuid"])["responses"][first_route] = Map({"label": "r"})
    _route_map(doc, env["routes"][3]["uuid"])["responses"][shared] = Map({"label": "s"})
    # a folder and a callback under route uuids, and an entity key that is no GUID
    doc.get("folders", type=Map)[first_route] = Map({"name": "f", "children": Array()})
    doc.get("callbacks", type=Map)[first_route] = Map({"name": "cb"})
    routes["not-a-uuid"] = Map({"endpoint": "odd key"})
    doc.get("rootChildren", type=Array).append({"type": "route", "uuid": "not-a-uuid"})


SECTION_3 = [
    _xml_fragments,
    _xml_element,
    _deep_maps,
    _sub_documents,
    _non_finite,
    _wrong_types,
    _response_without_fields,
    _meta_garbage,
    _last_migration_string,
    _last_migration_newer_dangling,
    _duplicate_uuids,
]


@pytest.mark.parametrize("hostile", SECTION_3, ids=[f.__name__.strip("_") for f in SECTION_3])
def test_content_no_environment_can_hold_exports_valid_and_stays_editable(hostile):
    env = load("test-env.json")
    a, b, c = replicas(env, 3)
    with b.transaction():
        hostile(b, env)
    update = b.get_update(a.get_state())
    a.apply_update(update)
    c.apply_update(b.get_update(c.get_state()))
    out = export_environment(a, env_id=env["uuid"])
    json.dumps(out, allow_nan=False)
    assert_mockoon_strict(out)
    # the same on every replica, and on every read
    for doc in (a, b, c, clone(a)):
        assert_strict_equal(export_environment(doc, env_id=env["uuid"]), out)
    # what it exports is a fixed point of a local write: no note, nothing changed
    prepared, notes = prepare(out, env["uuid"])
    assert notes == []
    assert_strict_equal(prepared, out)
    SECTION_3_CHECKS.get(hostile.__name__, lambda out, env: None)(out, env)
    # a patch still works (the helper checks that the write exports what `prepare` returned)
    edited = edit(a, lambda e: e.__setitem__("name", "patched"))
    assert edited["name"] == "patched"
    assert_mockoon_strict(export_environment(a, env_id=env["uuid"]))
    # and a put of the original file heals the document, on every replica
    before = export_environment(a, env_id=env["uuid"])
    prepared, _ = prepare(env, env["uuid"])
    apply_environment(a, prepared, old=before)
    assert_strict_equal(export_environment(a, env_id=env["uuid"]), env)
    sync_all(a, b, c)
    for doc in (a, b, c):
        assert_strict_equal(export_environment(doc, env_id=env["uuid"]), env)


def _check_xml_fragments(out, env):
    assert "x-xml" not in out and out["hostname"] == ""  # absent, then Mockoon's default
    assert out["routes"][0]["endpoint"] == ""
    assert out["routes"][1]["responses"][0]["x"] == [1]


def _check_xml_element(out, env):
    assert out["port"] == 3000 and out["name"] == "New environment"


def _check_deep_maps(out, env):
    depth, m = 0, out
    while "d" in m:
        m, depth = m["d"], depth + 1
    assert depth == 64  # the environment is depth 0: containers deeper than 64 are absent
    depth, a = 0, out["routes"][1]["responses"][0]["x-deep"]
    while a:
        a, depth = a[0], depth + 1
    assert depth == 64 - 5


def _check_sub_documents(out, env):
    assert "x-doc" not in out and out["name"] == "New environment"
    assert [r["uuid"] for r in out["routes"][0]["responses"]] == [
        r["uuid"] for r in env["routes"][0]["responses"]
    ]
    assert "x-bytes" not in out["routes"][1]["responses"][0]


def _check_non_finite(out, env):
    assert out["latency"] == 0 and out["x-inf"] == [{}]
    assert out["routes"][1]["responses"][0]["latency"] == 0
    assert out["routes"][1]["responses"][0]["statusCode"] == 200


def _check_wrong_types(out, env):
    # numeric strings convert as Mockoon's Joi schema converts them; the rest gets its defaults
    assert out["port"] == 3001 and out["headers"] == [] and out["cors"] is True
    assert out["tlsOptions"]["type"] == "CERT"
    response = out["routes"][1]["responses"][0]
    assert response["statusCode"] == 404 and response["headers"] == []
    assert response["rules"] == [
        {"target": "body", "modifier": "", "value": "", "invert": False, "operator": "equals"},
        {"target": "body", "invert": False, "modifier": "", "value": "", "operator": "equals"},
    ]


def _check_response_without_fields(out, env):
    added = next(r for r in out["routes"][1]["responses"] if r["uuid"] == GUID_A)
    assert added["label"] == "added through Yjs"
    assert added["statusCode"] == 200 and added["body"] == "{}" and added["headers"] == []
    assert added["crudKey"] == "id" and added["bodyType"] == "INLINE"
    bare = next(r for r in out["routes"] if r["endpoint"] == "bare")
    assert bare["method"] == "get" and bare["type"] == "http" and bare["responses"] == []
    folder = out["folders"][0]
    assert folder["name"] == "New folder" and folder["children"] == []
    bucket = next(d for d in out["data"] if d["name"] == "bucket")
    assert bucket["value"] == "[\n]" and len(bucket["id"]) == 4


def _check_meta_garbage(out, env):
    assert_strict_equal(out, env)


def _check_last_migration_string(out, env):
    assert_strict_equal(out["lastMigration"], 33)


def _check_last_migration_newer_dangling(out, env):
    assert out["lastMigration"] == 99999 and is_newer(out)
    assert_strict_equal(out["rootChildren"], env["rootChildren"])


def _check_duplicate_uuids(out, env):
    first_route = env["routes"][0]["uuid"]
    assert out["routes"][0]["uuid"] == first_route  # routes claim their uuids first
    assert first_route not in [f["uuid"] for f in out["folders"]]
    odd = next(r for r in out["routes"] if r["endpoint"] == "odd key")
    assert odd["uuid"] != "not-a-uuid"
    assert {"type": "route", "uuid": odd["uuid"]} in out["rootChildren"]  # the reference followed


SECTION_3_CHECKS = {
    f.__name__.replace("_check", ""): f
    for f in (
        _check_xml_fragments,
        _check_xml_element,
        _check_deep_maps,
        _check_sub_documents,
        _check_non_finite,
        _check_wrong_types,
        _check_response_without_fields,
        _check_meta_garbage,
        _check_last_migration_string,
        _check_last_migration_newer_dangling,
        _check_duplicate_uuids,
    )
}


def test_last_migration_string_then_patch_through_the_daemon_path():
    """`lastMigration: "33"` from a merge made every later patch fail with not-an-environment."""
    env = load("test-env.json")
    a, b = replicas(env)
    _last_migration_string(b, env)
    sync_all(a, b)
    for doc in (a, b):
        edited = edit(doc, lambda e: e["routes"][0].__setitem__("endpoint", "patched"))
        assert_strict_equal(edited["lastMigration"], 33)


def test_read_never_recurses_on_deep_nesting():
    """Far deeper than Python's recursion limit: read iteratively, cut at MAX_DEPTH."""
    env = load("test-env.json")
    (a,) = replicas(env, 1)
    with a.transaction():
        m = _env_map(a)
        for _ in range(5_000):
            m["d"] = Map()
            m = m["d"]
        folders = a.get("folders", type=Map)
        refs = a.get("rootChildren", type=Array)
        for i in range(2_000):  # folders nested 2,000 deep through their references
            uid = str(uuid.UUID(int=i + 1))
            folders[uid] = Map({"name": str(i), "children": Array()})
            child = {"type": "folder", "uuid": str(uuid.UUID(int=i + 2))}
            folders[uid]["children"].append(child)
        refs.append({"type": "folder", "uuid": str(uuid.UUID(int=1))})
    out = export_environment(a, env_id=env["uuid"])
    assert_mockoon_strict(out)
    assert len(out["folders"]) == 2_000


def test_prepare_refuses_what_the_read_would_drop():
    env = load("test-env.json")
    deep = env["x"] = {}
    for _ in range(63):
        deep["d"] = {}
        deep = deep["d"]
    prepare(env)  # 64 levels below the environment: the deepest allowed
    deep["d"] = {}
    with pytest.raises(ModelError) as info:
        prepare(env)
    assert info.value.message.startswith("/x/d/d/")
    assert info.value.message.endswith("is nested more than 64 levels deep")
    with pytest.raises(ModelError, match="^/routes/0/responses/0/x must be a JSON value"):
        env = load("test-env.json")
        env["routes"][0]["responses"][0]["x"] = b"bytes"
        prepare(env)


def test_entities_given_new_uuids_on_read_can_be_edited():
    """A patch of an entity the read renamed must write what the next read exports."""
    env = load("test-env.json")
    a, b = replicas(env)
    with b.transaction():
        _duplicate_uuids(b, env)
    sync_all(a, b)
    out = export_environment(a, env_id=env["uuid"])
    odd = next(i for i, r in enumerate(out["routes"]) if r["endpoint"] == "odd key")
    renamed = out["routes"][1]["responses"][-1]["uuid"]
    assert renamed != env["routes"][0]["uuid"]

    def change(e):
        e["routes"][odd]["endpoint"] = "edited"
        e["routes"][odd]["responses"] = [copy.deepcopy(e["routes"][1]["responses"][-1])]
        e["routes"][odd]["responses"][0]["uuid"] = GUID_A
        e["routes"][1]["responses"][-1]["label"] = "edited too"
        e["folders"][0]["name"] = "renamed folder, edited"

    edited = edit(a, change)  # checks that the document exports exactly what was written
    assert edited["routes"][odd]["uuid"] == out["routes"][odd]["uuid"]
    assert edited["routes"][1]["responses"][-1]["uuid"] == renamed
    sync_all(a, b)
    assert_strict_equal(export_environment(b, env_id=env["uuid"]), edited)
    assert_mockoon_strict(edited)


def test_unreachable_folders_then_routes_are_reattached_in_list_order():
    """Issue 8, section 7: in list order, not reversed, nor sorted by uuid."""
    env = load("test-env.json")
    late, early = "ffffffff-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"
    env["folders"] = [
        {"uuid": late, "name": "first in the list", "children": []},
        {"uuid": early, "name": "second in the list", "children": []},
    ]
    a, b = replicas(env)
    refs = b.get("rootChildren", type=Array)
    del refs[0 : len(refs)]  # nothing is reachable
    a.apply_update(b.get_update(a.get_state()))
    out = export_environment(a, env_id=env["uuid"])
    assert out["rootChildren"] == [
        {"type": "folder", "uuid": late},
        {"type": "folder", "uuid": early},
    ] + [{"type": "route", "uuid": r["uuid"]} for r in env["routes"]]
    assert_mockoon_strict(out)
