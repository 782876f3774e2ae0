"""Concurrent edits on replicas of one environment, and the size of what an edit sends.

Every edit is made as the daemon makes it: export, change the JSON, prepare + apply_environment.
"""

import copy
import json
import random
import uuid

import pytest
from modelutil import (
    assert_converged,
    assert_strict_equal,
    assert_valid_environment,
    clone,
    edit,
    load,
    refs_to,
    replicas,
    route,
    route_ids,
    sync_all,
    sync_pair,
    tree_order,
)
from pycrdt import Doc

from peerdaemon.model import apply_environment, export_environment, import_environment, prepare

BODY = 'é😀 first line\nsecond 😀 line é\n{"third": "línea 3"}\n'
F1, F2 = "f1000000-0000-4000-8000-000000000001", "f2000000-0000-4000-8000-000000000002"


def base_env():
    """test-env.json with two empty folders, a multibyte body and a response with 3 headers."""
    env = load("test-env.json")
    env["folders"] = [
        {"uuid": F1, "name": "Folder one", "children": []},
        {"uuid": F2, "name": "Folder two", "children": []},
    ]
    env["rootChildren"] += [{"type": "folder", "uuid": F1}, {"type": "folder", "uuid": F2}]
    env["routes"][0]["responses"][0]["body"] = BODY
    env["routes"][1]["responses"][0]["headers"] = [
        {"key": "Content-Type", "value": "application/json"},
        {"key": "X-One", "value": "1"},
        {"key": "X-Two", "value": "2"},
    ]
    return env


def guid(tag):
    """A uuid Mockoon's schema accepts, the same for the same tag."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, tag))


def new_route(uid, endpoint):
    r = copy.deepcopy(load("test-env.json")["routes"][0])
    r["uuid"], r["endpoint"] = uid, endpoint
    r["responses"][0]["uuid"] = guid(uid + "-response")
    return r


def add_route(env, r, index=None):
    index = len(env["routes"]) if index is None else index
    env["routes"].insert(index, r)
    env["rootChildren"].insert(index, {"type": "route", "uuid": r["uuid"]})


def delete_route(env, uid):
    env["routes"] = [r for r in env["routes"] if r["uuid"] != uid]
    env["rootChildren"] = [c for c in env["rootChildren"] if c["uuid"] != uid]
    for f in env["folders"]:
        f["children"] = [c for c in f["children"] if c["uuid"] != uid]


def move_route(env, uid, index):
    """Move a route in both the routes list and rootChildren, as Mockoon's drag and drop does."""
    r = route(env, uid)
    env["routes"].remove(r)
    env["routes"].insert(index, r)
    ref = next(c for c in env["rootChildren"] if c["uuid"] == uid)
    env["rootChildren"].remove(ref)
    env["rootChildren"].insert(index, ref)


def into_folder(env, uid, folder):
    ref = {"type": "route", "uuid": uid}
    env["rootChildren"] = [c for c in env["rootChildren"] if c["uuid"] != uid]
    f = next(f for f in env["folders"] if f["uuid"] == folder)
    f["children"].append(ref)


def body(env, i=0):
    return env["routes"][i]["responses"][0]["body"]


def set_body(env, text, i=0):
    env["routes"][i]["responses"][0]["body"] = text


# ---------------------------------------------------------------------------------------------
# concurrent edits


def test_edits_of_different_properties_of_one_route_both_survive():
    a, b = replicas(base_env())
    uid = base_env()["routes"][3]["uuid"]

    def on_a(env):
        route(env, uid)["endpoint"] = "renamed"
        route(env, uid)["responses"][0]["statusCode"] = 201

    def on_b(env):
        route(env, uid)["method"] = "post"
        route(env, uid)["documentation"] = "Documented on B"
        route(env, uid)["responses"][0]["label"] = "B's label"

    edit(a, on_a)
    edit(b, on_b)
    sync_pair(a, b)
    out = assert_converged(a, b)
    r = route(out, uid)
    assert (r["endpoint"], r["method"], r["documentation"]) == (
        "renamed",
        "post",
        "Documented on B",
    )
    assert (r["responses"][0]["statusCode"], r["responses"][0]["label"]) == (201, "B's label")
    expected = base_env()
    on_a(expected)
    on_b(expected)
    assert_strict_equal(out, expected)


@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_route_additions_all_survive_in_one_order(n):
    docs = replicas(base_env(), n)
    for i, doc in enumerate(docs):
        edit(doc, lambda env, i=i: add_route(env, new_route(guid(f"new-{i}"), f"added-on-{i}"), 2))
    sync_all(*docs)
    out = assert_converged(*docs)
    new = {guid(f"new-{i}") for i in range(n)}
    added = [u for u in route_ids(out) if u in new]
    assert sorted(added) == sorted(new)
    assert route_ids(out)[:2] == route_ids(base_env())[:2]
    assert route_ids(out)[2 : 2 + n] == added  # all inserted where each replica put its own
    for uid in added:
        assert len(refs_to(out, uid)) == 1
        assert route(out, uid)["responses"][0]["uuid"] == guid(uid + "-response")
    assert len(out["routes"]) == len(base_env()["routes"]) + n


def test_concurrent_reorders_and_delete_converge_without_duplicates_or_losses():
    env = base_env()
    ids = route_ids(env)
    a, b, c = replicas(env, 3)
    edit(a, lambda e: move_route(e, ids[0], 9))
    edit(b, lambda e: move_route(e, ids[8], 0))
    edit(c, lambda e: delete_route(e, ids[5]))
    edit(c, lambda e: move_route(e, ids[1], 3))
    sync_all(a, b, c)
    out = assert_converged(a, b, c)
    assert sorted(route_ids(out)) == sorted(set(ids) - {ids[5]})
    assert len(tree_order(out)) == len(ids) - 1
    order = route_ids(out)
    assert order[0] == ids[8]
    assert order.index(ids[0]) > order.index(ids[7])


def test_concurrent_moves_of_the_same_route_converge():
    env = base_env()
    ids = route_ids(env)
    a, b = replicas(env)
    edit(a, lambda e: move_route(e, ids[4], 0))
    edit(b, lambda e: move_route(e, ids[4], 9))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert route_ids(out).count(ids[4]) == 1 and len(refs_to(out, ids[4])) == 1
    assert sorted(route_ids(out)) == sorted(ids)


def test_route_edited_on_one_replica_and_deleted_on_another():
    env = base_env()
    uid = env["routes"][2]["uuid"]
    a, b = replicas(env)

    def on_a(e):
        route(e, uid)["endpoint"] = "edited"
        route(e, uid)["responses"][0]["body"] = "edited body"

    edit(a, on_a)
    edit(b, lambda e: delete_route(e, uid))
    sync_pair(a, b)
    out = assert_converged(a, b)
    # the deletion of the route's map wins over edits inside it: no half-route comes back
    assert uid not in route_ids(out) and refs_to(out, uid) == []
    expected = base_env()
    delete_route(expected, uid)
    assert_strict_equal(out, expected)


def test_route_deleted_on_one_replica_and_moved_on_another():
    env = base_env()
    uid = env["routes"][2]["uuid"]
    a, b = replicas(env)
    edit(a, lambda e: move_route(e, uid, 7))
    edit(b, lambda e: delete_route(e, uid))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert uid not in route_ids(out) and refs_to(out, uid) == []


def test_same_route_moved_into_two_folders_is_referenced_once():
    env = base_env()
    uid = env["routes"][4]["uuid"]
    a, b = replicas(env)
    edit(a, lambda e: into_folder(e, uid, F1))
    edit(b, lambda e: into_folder(e, uid, F2))
    sync_pair(a, b)
    out = assert_converged(a, b)
    refs = refs_to(out, uid)
    assert refs == [{"type": "route", "uuid": uid}]
    folders = {f["uuid"]: f for f in out["folders"]}
    # depth first from rootChildren, the first folder wins
    assert folders[F1]["children"] == refs and folders[F2]["children"] == []
    assert not any(c["uuid"] == uid for c in out["rootChildren"])


def test_folders_moved_into_each_other_do_not_make_a_cycle():
    a, b = replicas(base_env())

    def nest(e, inner, outer):
        e["rootChildren"] = [c for c in e["rootChildren"] if c["uuid"] != inner]
        next(f for f in e["folders"] if f["uuid"] == outer)["children"].append(
            {"type": "folder", "uuid": inner}
        )

    edit(a, lambda e: nest(e, F1, F2))
    edit(b, lambda e: nest(e, F2, F1))
    sync_pair(a, b)
    out = assert_converged(a, b)  # the checker refuses cycles and unreachable folders
    assert {f["uuid"] for f in out["folders"]} == {F1, F2}


def test_concurrent_edits_of_different_headers_merge_per_item():
    env = base_env()
    a, b = replicas(env)

    def headers(e):
        return e["routes"][1]["responses"][0]["headers"]

    edit(a, lambda e: headers(e)[1].update(value="one on A"))
    edit(b, lambda e: headers(e)[2].update(value="two on B", key="X-Two-B"))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert headers(out) == [
        {"key": "Content-Type", "value": "application/json"},
        {"key": "X-One", "value": "one on A"},
        {"key": "X-Two-B", "value": "two on B"},
    ]


def test_headers_added_on_both_sides_are_both_kept():
    env = base_env()
    a, b = replicas(env)

    def headers(e):
        return e["routes"][1]["responses"][0]["headers"]

    edit(a, lambda e: headers(e).append({"key": "X-From-A", "value": "a"}))
    edit(a, lambda e: e["headers"].append({"key": "Env-A", "value": "a"}))
    edit(b, lambda e: headers(e).append({"key": "X-From-B", "value": "b"}))
    edit(b, lambda e: headers(e)[0].update(value="text/plain"))
    edit(b, lambda e: e["headers"].insert(0, {"key": "Env-B", "value": "b"}))
    sync_pair(a, b)
    out = assert_converged(a, b)
    hs = headers(out)
    assert hs[:3] == [
        {"key": "Content-Type", "value": "text/plain"},
        {"key": "X-One", "value": "1"},
        {"key": "X-Two", "value": "2"},
    ]
    assert sorted(h["key"] for h in hs[3:]) == ["X-From-A", "X-From-B"]
    assert [h["key"] for h in out["headers"]] == ["Env-B", "Content-Type", "Env-A"]


def test_header_deleted_on_one_side_and_edited_on_the_other():
    a, b = replicas(base_env())

    def headers(e):
        return e["routes"][1]["responses"][0]["headers"]

    edit(a, lambda e: headers(e).pop(1))
    edit(b, lambda e: headers(e)[2].update(value="edited"))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert [h["key"] for h in headers(out)] == ["Content-Type", "X-Two"]
    assert headers(out)[1]["value"] == "edited"


def test_body_edited_at_two_places_keeps_both_edits():
    a, b = replicas(base_env())
    # both edit points come after multibyte characters (UTF-8 byte offsets differ from indexes)
    edit(a, lambda e: set_body(e, body(e).replace("first line", "first [A] line")))
    edit(b, lambda e: set_body(e, body(e).replace('"línea 3"', '"línea tres 😀"')))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert body(out) == 'é😀 first [A] line\nsecond 😀 line é\n{"third": "línea tres 😀"}\n'


def test_body_edits_at_three_places_on_three_replicas():
    a, b, c = replicas(base_env(), 3)
    edit(a, lambda e: set_body(e, "😀" + body(e)))  # at the very start
    edit(b, lambda e: set_body(e, body(e).replace("second 😀 line", "second 😀😀 line")))
    edit(c, lambda e: set_body(e, body(e).replace("é\n{", "è\n{")))  # a replacement
    sync_all(a, b, c)
    out = assert_converged(a, b, c)
    assert body(out) == '😀é😀 first line\nsecond 😀😀 line è\n{"third": "línea 3"}\n'


def test_body_deletion_and_insertion_elsewhere():
    a, b = replicas(base_env())
    edit(a, lambda e: set_body(e, body(e).replace("second 😀 line é\n", "")))
    edit(b, lambda e: set_body(e, body(e).replace("first", "1st")))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert body(out) == 'é😀 1st line\n{"third": "línea 3"}\n'


def test_edits_far_apart_in_a_large_one_line_body_keep_a_concurrent_edit_between():
    """A minified JSON body is one long line: two edits far apart must not replace all between."""
    rng = random.Random(7)
    items = [{"id": i, "name": f"n{i}é😀", "v": rng.random()} for i in range(2000)]
    big = json.dumps(items, separators=(",", ":"))
    env = base_env()
    set_body(env, big)
    a, b = replicas(env)
    state = a.get_state()
    edit(a, lambda e: set_body(e, big[:100] + "X" + big[100:60000] + "Y" + big[60000:]))
    assert len(a.get_update(state)) < 1024
    edit(b, lambda e: set_body(e, big[:30000] + "MID" + big[30000:]))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert (
        body(out) == big[:100] + "X" + big[100:30000] + "MID" + big[30000:60000] + "Y" + big[60000:]
    )


def test_both_replicas_insert_at_the_same_place():
    a, b = replicas(base_env())
    edit(a, lambda e: set_body(e, body(e).replace("first", "firstAAA")))
    edit(b, lambda e: set_body(e, body(e).replace("first", "firstBBB")))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert body(out) in (
        BODY.replace("first", "firstAAABBB"),
        BODY.replace("first", "firstBBBAAA"),
    )


@pytest.mark.parametrize(
    ("field", "va", "vb"),
    [
        ("statusCode", 201, 404),
        ("latency", 0.5, 3),
        ("disableTemplating", True, False),
        ("label", "from A", ""),
        ("x-unknown", True, 1),
        ("x-other", "from A", None),
    ],
)
def test_concurrent_writes_of_one_scalar_converge_to_one_value(field, va, vb):
    a, b = replicas(base_env())
    edit(a, lambda e: e["routes"][5]["responses"][0].__setitem__(field, va))
    edit(b, lambda e: e["routes"][5]["responses"][0].__setitem__(field, vb))
    sync_pair(a, b)
    out = assert_converged(a, b)
    value = out["routes"][5]["responses"][0][field]
    assert any(type(value) is type(v) and value == v for v in (va, vb))


def test_concurrent_environment_property_writes():
    a, b, c = replicas(base_env(), 3)
    edit(a, lambda e: e.update(port=3001, name="A"))
    edit(b, lambda e: e.update(port=3002))
    edit(c, lambda e: e["tlsOptions"].update(enabled=True))
    sync_all(a, b, c)
    out = assert_converged(a, b, c)
    assert out["port"] in (3001, 3002) and out["name"] == "A" and out["tlsOptions"]["enabled"]


def test_whole_file_write_and_a_concurrent_body_edit_both_survive():
    env = base_env()
    a, b = replicas(env)
    # A: a teammate's editor saves the complete file, with one response label changed
    saved = base_env()
    saved["routes"][2]["responses"][0]["label"] = "relabelled in the editor"
    prepared, _ = prepare(json.loads(json.dumps(saved)))
    apply_environment(a, prepared)
    # B: meanwhile, another route's body is edited
    edit(b, lambda e: set_body(e, body(e).replace("second", "SECOND"), 0))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert out["routes"][2]["responses"][0]["label"] == "relabelled in the editor"
    assert body(out) == BODY.replace("second", "SECOND")
    expected = base_env()
    expected["routes"][2]["responses"][0]["label"] = "relabelled in the editor"
    set_body(expected, BODY.replace("second", "SECOND"))
    assert_strict_equal(out, expected)


def test_whole_file_write_of_a_reordered_file_keeps_a_concurrent_route_edit():
    env = base_env()
    ids = route_ids(env)
    a, b = replicas(env)
    saved = base_env()
    saved["routes"].reverse()
    saved["rootChildren"] = [c for c in saved["rootChildren"] if c["type"] == "route"][::-1] + [
        c for c in saved["rootChildren"] if c["type"] == "folder"
    ]
    apply_environment(a, prepare(saved)[0])
    edit(b, lambda e: route(e, ids[0]).update(endpoint="edited-while-moving"))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert route_ids(out) == ids[::-1]
    assert route(out, ids[0])["endpoint"] == "edited-while-moving"


def test_concurrent_response_additions_and_reorder_in_one_route():
    env = base_env()
    uid = env["routes"][1]["uuid"]
    a, b = replicas(env)

    def add_response(e, rid, label):
        resp = copy.deepcopy(route(e, uid)["responses"][0])
        resp["uuid"], resp["label"] = rid, label
        route(e, uid)["responses"].append(resp)

    edit(a, lambda e: add_response(e, guid("resp-a"), "A"))
    edit(b, lambda e: add_response(e, guid("resp-b"), "B"))
    edit(b, lambda e: route(e, uid)["responses"].reverse())
    sync_pair(a, b)
    out = assert_converged(a, b)
    got = [r["uuid"] for r in route(out, uid)["responses"]]
    first = env["routes"][1]["responses"][0]["uuid"]
    assert sorted(got) == sorted([guid("resp-a"), guid("resp-b"), first])


def test_data_buckets_and_callbacks_merge_per_character_and_per_item():
    env = load("callbacks.json")
    env["data"][0]["value"] = '[{"id": "é😀", "n": 1}]'
    a, b = replicas(env)
    cb = env["callbacks"][0]["uuid"]

    def callback(e):
        return next(c for c in e["callbacks"] if c["uuid"] == cb)

    edit(a, lambda e: e["data"][0].update(value=e["data"][0]["value"].replace('"n": 1', '"n": 2')))
    edit(b, lambda e: e["data"][0].update(value=e["data"][0]["value"].replace("é😀", "é😀-B")))
    edit(a, lambda e: callback(e).update(body="A" + (callback(e)["body"] or "")))
    edit(b, lambda e: callback(e).update(body=(callback(e)["body"] or "") + "B"))
    edit(a, lambda e: callback(e)["headers"].append({"key": "X-A", "value": "a"}))
    edit(b, lambda e: callback(e).update(name="renamed on B"))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert out["data"][0]["value"] == '[{"id": "é😀-B", "n": 2}]'
    c = callback(out)
    assert c["body"] == "A" + (callback(env)["body"] or "") + "B"
    assert c["headers"][-1] == {"key": "X-A", "value": "a"} and c["name"] == "renamed on B"


def test_replicas_that_never_saw_each_other_import_converge():
    """Two independent imports of the same file are two histories; after a sync, one document."""
    a, _, _ = import_environment(base_env())
    b, _, _ = import_environment(base_env())
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert len(out["routes"]) == len(base_env()["routes"])


# ---------------------------------------------------------------------------------------------
# minimal edits


class Counter:
    """Counts transactions that changed the document."""

    def __init__(self, doc):
        self.count = 0
        self.sub = doc.observe(self)

    def __call__(self, event):
        if event.update and event.update != b"\x00\x00":
            self.count += 1


def test_applying_the_same_json_twice_changes_nothing():
    env = base_env()
    doc, prepared, _ = import_environment(env)
    counter = Counter(doc)
    before_state, before_update = doc.get_state(), doc.get_update()
    apply_environment(doc, prepared)
    apply_environment(doc, prepare(copy.deepcopy(env))[0])
    apply_environment(doc, prepare(export_environment(doc))[0])
    apply_environment(doc, prepare(json.loads(json.dumps(env)))[0])
    assert counter.count == 0
    assert doc.get_state() == before_state
    assert doc.get_update() == before_update
    # the counter does see real changes
    edit(doc, lambda e: e.update(name="changed"))
    assert counter.count == 1
    # and an update made of nothing applies nothing to a replica
    replica = clone(doc)
    state = doc.get_state()
    apply_environment(doc, prepare(export_environment(doc))[0])
    replica_counter = Counter(replica)
    replica.apply_update(doc.get_update(state))
    assert replica_counter.count == 0


def test_after_a_merge_applying_the_export_changes_nothing():
    a, b = replicas(base_env())
    edit(a, lambda e: move_route(e, route_ids(e)[0], 5))
    edit(b, lambda e: move_route(e, route_ids(e)[0], 7))
    edit(b, lambda e: into_folder(e, route_ids(e)[3], F1))
    edit(a, lambda e: into_folder(e, route_ids(e)[3], F2))
    sync_pair(a, b)
    counter = Counter(a)
    apply_environment(a, prepare(export_environment(a))[0])
    # the repaired references (the route held by two folders) are written once...
    first = counter.count
    apply_environment(a, prepare(export_environment(a))[0])
    # ...and then nothing changes any more
    assert counter.count == first <= 1
    assert_converged(a)


@pytest.mark.parametrize("shape", ["lines", "one-line"])
def test_one_character_in_a_100kb_body_is_a_small_update(shape):
    rng = random.Random(3)
    words = ["alpha", "béta", "😀", "gamma", "delta", "ε", "{", "}", ":", ","]
    sep = "\n" if shape == "lines" else " "
    big = sep.join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))
    while len(big.encode()) < 100_000:
        big += sep + big[:1000]
    env = base_env()
    set_body(env, big, 3)
    a, b = replicas(env)
    state = a.get_state()
    pos = len(big) // 2
    changed = big[:pos] + ("Z" if big[pos] != "Z" else "Y") + big[pos + 1 :]
    edit(a, lambda e: set_body(e, changed, 3))
    update = a.get_update(state)
    assert len(update) < 1024
    b.apply_update(update)
    assert body(export_environment(b), 3) == changed
    # inserting a character and deleting one far away
    state = a.get_state()
    twice = "!" + changed[:-10] + changed[-9:]
    edit(a, lambda e: set_body(e, twice, 3))
    assert len(a.get_update(state)) < 1024
    sync_pair(a, b)
    assert body(assert_converged(a, b), 3) == twice


def test_moving_a_route_is_a_small_update_and_keeps_a_concurrent_edit():
    env = base_env()
    ids = route_ids(env)
    a, b = replicas(env)
    set_body(env, "x" * 20_000, 2)  # a big route: moving it must not copy it
    a, b = replicas(env)
    state = a.get_state()
    edit(a, lambda e: move_route(e, ids[2], 8))
    assert len(a.get_update(state)) < 400
    edit(b, lambda e: set_body(e, "y" + body(e, 2), 2))
    edit(b, lambda e: route(e, ids[2]).update(endpoint="edited"))
    sync_pair(a, b)
    out = assert_converged(a, b)
    assert route_ids(out).index(ids[2]) == 8 and tree_order(out).index(ids[2]) == 8
    assert route(out, ids[2])["endpoint"] == "edited"
    assert route(out, ids[2])["responses"][0]["body"] == "y" + "x" * 20_000
    # moving into a folder is small too
    state = a.get_state()
    edit(a, lambda e: into_folder(e, ids[2], F2))
    assert len(a.get_update(state)) < 400


def test_editing_one_header_sends_only_that_header():
    env = base_env()
    env["routes"][1]["responses"][0]["headers"] += [
        {"key": f"X-{i}", "value": "v" * 200} for i in range(50)
    ]
    a, b = replicas(env)
    state = a.get_state()
    edit(a, lambda e: e["routes"][1]["responses"][0]["headers"][30].update(value="short"))
    assert len(a.get_update(state)) < 400


def test_update_bytes_from_an_edit_rebuild_the_same_document():
    a, _ = replicas(base_env())
    edit(a, lambda e: add_route(e, new_route(guid("n1"), "n1"), 0))
    edit(a, lambda e: into_folder(e, guid("n1"), F1))
    fresh = Doc()
    fresh.apply_update(a.get_update())
    assert_strict_equal(export_environment(fresh), export_environment(a))
    assert_valid_environment(export_environment(fresh))
