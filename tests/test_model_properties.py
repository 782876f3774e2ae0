"""Property-based tests: random edit sequences on 2 and 3 replicas with random syncs converge.

Every edit goes through JSON + prepare + apply_environment, as the daemon makes it. The examples
are derandomized (the same on every run); a failure prints the falsifying program, which can be
replayed with `run_program`.
"""

import copy
import json
import math
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelutil import (
    assert_converged,
    assert_mockoon_strict,
    assert_strict_equal,
    assert_valid_environment,
    clone,
    load,
    replicas,
    sync_all,
)

from peerdaemon.model import apply_environment, export_environment, import_environment, prepare

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from('ab \n{}"é😀ü漢'),
        st.characters(exclude_categories=("Cs",)),  # any code point but lone surrogates
    ),
    max_size=6,
)
IDX = st.integers(0, 1_000)

OPS = st.one_of(
    st.tuples(st.just("add_route"), IDX, IDX),
    st.tuples(st.just("delete_route"), IDX),
    st.tuples(st.just("move_route"), IDX, IDX, IDX),
    st.tuples(
        st.just("edit_route"), IDX, st.sampled_from(["endpoint", "method", "documentation"]), TEXT
    ),
    st.tuples(st.just("add_response"), IDX, IDX),
    st.tuples(st.just("delete_response"), IDX, IDX),
    st.tuples(st.just("move_response"), IDX, IDX, IDX),
    st.tuples(st.just("edit_response"), IDX, IDX, st.sampled_from([200, 201, 404, 100.5, 999])),
    st.tuples(st.just("edit_body"), IDX, IDX, IDX, st.integers(0, 4), TEXT),
    st.tuples(st.just("add_folder"), IDX, IDX),
    st.tuples(st.just("move_folder"), IDX, IDX, IDX),
    st.tuples(st.just("edit_header"), IDX, IDX, IDX, TEXT),
    st.tuples(st.just("add_header"), IDX, IDX, IDX, TEXT),
    st.tuples(st.just("delete_header"), IDX, IDX, IDX),
    st.tuples(st.just("edit_env"), st.sampled_from(["port", "name", "latency"]), IDX),
)


def program(n):
    """A list of steps: ("edit", replica, op) or ("sync", from, to) (one way) or ("syncall",)."""
    replica = st.integers(0, n - 1)
    return st.lists(
        st.one_of(
            st.tuples(st.just("edit"), replica, OPS),
            st.tuples(st.just("edit"), replica, OPS),
            st.tuples(st.just("edit"), replica, OPS),
            st.tuples(st.just("sync"), replica, replica),
            st.tuples(st.just("syncall")),
        ),
        min_size=1,
        max_size=30,
    )


# ---------------------------------------------------------------------------------------------
# the edits, on environment JSON


def guid(tag):
    """A uuid Mockoon's schema accepts, the same for the same tag."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, tag))


def base_env():
    env = load("basic-folder-2-routes.json")
    env["lastMigration"] = 33
    for r in env["routes"]:  # what Mockoon's migration 33 adds
        r.update(streamingMode=None, streamingInterval=0)
    extra = copy.deepcopy(env["routes"][0])
    extra["uuid"], extra["endpoint"] = guid("route-base-3"), "at-root"
    extra["responses"][0]["uuid"] = guid("response-base-3")
    extra["responses"][0]["body"] = 'é😀 {"a": 1}\nline two ü'
    extra["responses"][0]["headers"] = [{"key": "Content-Type", "value": "application/json"}]
    env["routes"].append(extra)
    env["rootChildren"].append({"type": "route", "uuid": extra["uuid"]})
    return env


def _containers(env):
    """Every list of references: rootChildren first, then each folder's children."""
    return [env["rootChildren"]] + [f["children"] for f in env["folders"]]


def _unlink(env, rtype, uid):
    for refs in _containers(env):
        refs[:] = [r for r in refs if not (r.get("type") == rtype and r.get("uuid") == uid)]


def _link(env, rtype, uid, where, pos):
    containers = _containers(env)
    refs = containers[where % len(containers)]
    refs.insert(pos % (len(refs) + 1), {"type": rtype, "uuid": uid})


def _response(env, i, j):
    if not env["routes"]:
        return None
    responses = env["routes"][i % len(env["routes"])]["responses"]
    return responses[j % len(responses)] if responses else None


def apply_op(env, op, name, log):
    """Apply `op` to `env` in place; `name` makes the uuids it creates unique; `log` records."""
    kind, *args = op
    routes = env["routes"]
    if kind == "add_route":
        pos, where = args
        r = copy.deepcopy(base_env()["routes"][0])
        r["uuid"], r["endpoint"] = guid(f"route-{name}"), f"e-{name}"
        r["responses"][0]["uuid"] = guid(f"response-{name}")
        routes.insert(pos % (len(routes) + 1), r)
        _link(env, "route", r["uuid"], where, pos)
        log["created_routes"].add(r["uuid"])
        log["responses"][r["responses"][0]["uuid"]] = r["uuid"]
    elif kind == "delete_route" and routes:
        r = routes.pop(args[0] % len(routes))
        _unlink(env, "route", r["uuid"])
        log["deleted_routes"].add(r["uuid"])
    elif kind == "move_route" and routes:
        i, where, pos = args
        r = routes.pop(i % len(routes))
        routes.insert(pos % (len(routes) + 1), r)
        _unlink(env, "route", r["uuid"])
        _link(env, "route", r["uuid"], where, pos)
    elif kind == "edit_route" and routes:
        i, field, text = args
        routes[i % len(routes)][field] = text
    elif kind == "add_response" and routes:
        i, pos = args
        r = routes[i % len(routes)]
        resp = copy.deepcopy(base_env()["routes"][0]["responses"][0])
        resp["uuid"], resp["label"] = guid(f"response-{name}"), name
        r["responses"].insert(pos % (len(r["responses"]) + 1), resp)
        log["responses"][resp["uuid"]] = r["uuid"]
    elif kind == "delete_response" and routes:
        i, j = args
        responses = routes[i % len(routes)]["responses"]
        if responses:
            log["deleted_responses"].add(responses.pop(j % len(responses))["uuid"])
    elif kind == "move_response" and routes:
        i, j, pos = args
        responses = routes[i % len(routes)]["responses"]
        if responses:
            resp = responses.pop(j % len(responses))
            responses.insert(pos % (len(responses) + 1), resp)
    elif kind == "edit_response":
        i, j, value = args
        resp = _response(env, i, j)
        if resp is not None:
            resp["statusCode"] = value
    elif kind == "edit_body":
        i, j, pos, delete, text = args
        resp = _response(env, i, j)
        if resp is not None and isinstance(resp.get("body"), str):
            body = resp["body"]
            p = pos % (len(body) + 1)
            resp["body"] = body[:p] + text + body[p + delete :]
    elif kind == "add_folder":
        where, pos = args
        uid = guid(f"folder-{name}")
        env["folders"].append({"uuid": uid, "name": name, "children": []})
        _link(env, "folder", uid, where, pos)
    elif kind == "move_folder" and env["folders"]:
        i, where, pos = args
        uid = env["folders"][i % len(env["folders"])]["uuid"]
        _unlink(env, "folder", uid)
        _link(env, "folder", uid, where, pos)  # maybe into itself or a descendant: repaired
    elif kind in ("edit_header", "add_header", "delete_header"):
        i, j, h, *text = args
        resp = _response(env, i, j)
        if resp is None:
            return
        headers = resp["headers"]
        if kind == "add_header":
            headers.insert(h % (len(headers) + 1), {"key": f"X-{name}", "value": text[0]})
        elif headers and kind == "edit_header":
            headers[h % len(headers)]["value"] = text[0]
        elif headers:
            headers.pop(h % len(headers))
    elif kind == "edit_env":
        field, value = args
        env[field] = value if field != "name" else f"name {value} é"


def new_log():
    base = base_env()
    return {
        "created_routes": {r["uuid"] for r in base["routes"]},
        "responses": {resp["uuid"]: r["uuid"] for r in base["routes"] for resp in r["responses"]},
        "deleted_routes": set(),
        "deleted_responses": set(),
    }


def run_program(steps, n):
    """Replay a program on `n` fresh replicas; returns the replicas and the log."""
    docs = replicas(base_env(), n)
    log = new_log()
    for index, step in enumerate(steps):
        if step[0] == "edit":
            _, r, op = step
            doc = docs[r]
            env = copy.deepcopy(export_environment(doc))
            apply_op(env, op, f"{r}-{index}", log)
            prepared, _ = prepare(env)
            apply_environment(doc, prepared)
            assert_valid_environment(export_environment(doc))
        elif step[0] == "sync":
            _, src, dst = step
            if src != dst:
                docs[dst].apply_update(docs[src].get_update(docs[dst].get_state()))
        else:
            sync_all(*docs)
    return docs, log


def check_final(docs, log):
    sync_all(*docs)
    out = assert_converged(*docs)
    assert_mockoon_strict(out)
    # nothing that nobody deleted is lost
    routes = {r["uuid"] for r in out["routes"]}
    assert routes == log["created_routes"] - log["deleted_routes"]
    responses = {resp["uuid"]: r["uuid"] for r in out["routes"] for resp in r["responses"]}
    assert responses == {
        resp: r
        for resp, r in log["responses"].items()
        if r in routes and resp not in log["deleted_responses"]
    }
    # the update bytes rebuild the same document
    assert_strict_equal(export_environment(clone(docs[0])), out)
    # export is a fixed point: applying it as a whole-file write does not change what exports
    for doc in docs:
        apply_environment(doc, prepare(out)[0])
        assert_strict_equal(export_environment(doc), out)
    sync_all(*docs)
    assert_strict_equal(assert_converged(*docs), out)


@settings(max_examples=200, **SETTINGS)
@given(program(2))
def test_two_replicas_converge_to_a_valid_environment(steps):
    check_final(*run_program(steps, 2))


@settings(max_examples=150, **SETTINGS)
@given(program(3))
def test_three_replicas_converge_to_a_valid_environment(steps):
    check_final(*run_program(steps, 3))


# ---------------------------------------------------------------------------------------------
# text: concurrent insertions are all kept, each replica's text a subsequence of the merge


def _is_subsequence(small, big):
    it = iter(big)
    return all(ch in it for ch in small)


INSERTS = st.lists(st.tuples(st.integers(0, 1_000), TEXT.filter(bool)), min_size=1, max_size=4)


@settings(max_examples=150, **SETTINGS)
@given(
    st.text(alphabet=st.sampled_from("aé😀\n{} ü"), max_size=20),
    st.lists(INSERTS, min_size=2, max_size=3),
)
def test_concurrent_insertions_in_a_body_are_all_kept(start, inserts_per_replica):
    env = base_env()
    env["routes"][2]["responses"][0]["body"] = start
    docs = replicas(env, len(inserts_per_replica))
    finals = []
    for doc, inserts in zip(docs, inserts_per_replica, strict=True):
        e = copy.deepcopy(export_environment(doc))
        text = e["routes"][2]["responses"][0]["body"]
        for pos, piece in inserts:  # one whole-file write per insertion
            p = pos % (len(text) + 1)
            text = text[:p] + piece + text[p:]
            e["routes"][2]["responses"][0]["body"] = text
            apply_environment(doc, prepare(e)[0])
        finals.append(text)
    sync_all(*docs)
    merged = assert_converged(*docs)["routes"][2]["responses"][0]["body"]
    assert len(merged) == len(start) + sum(len(f) - len(start) for f in finals)
    for final in finals:
        assert _is_subsequence(final, merged)


# ---------------------------------------------------------------------------------------------
# unknown fields: any JSON value round trips as JavaScript would write it, and is edited in place


def js(value):
    """What JSON.stringify(JSON.parse(...)) makes of a value (within the safe integer range)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {k: js(v) for k, v in value.items()}
    if isinstance(value, list):
        return [js(v) for v in value]
    return value


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, **SETTINGS)
@given(JSON_VALUES, JSON_VALUES, JSON_VALUES)
def test_any_unknown_value_round_trips_and_is_edited_in_place(first, second, header_value):
    env = base_env()
    env["x-unknown"] = first
    env["routes"][0]["x-unknown"] = [first, {"k": second}]
    doc, _, _ = import_environment(env)
    assert_strict_equal(export_environment(doc), js(env))
    replica = clone(doc)
    env["x-unknown"] = second
    env["routes"][0]["x-unknown"] = [second, {"k": first}]
    env["headers"][0]["x-unknown"] = header_value
    apply_environment(doc, prepare(env)[0])
    assert_strict_equal(export_environment(doc), js(env))
    replica.apply_update(doc.get_update(replica.get_state()))
    assert_strict_equal(export_environment(replica), js(env))
    # and a second write of the same is empty
    before = doc.get_update()
    apply_environment(doc, prepare(json.loads(json.dumps(env)))[0])
    assert doc.get_update() == before


def test_js_helper():
    assert js(2.0) == 2 and type(js(2.0)) is int
    assert type(js(1e21)) is float and type(js(0.5)) is float
    assert math.isclose(js(-0.25), -0.25)
