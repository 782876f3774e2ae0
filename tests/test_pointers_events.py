"""The paths of a merged update, told from its events (core/pointers.py `Touched`), against the
diff of the exports before and after: the same for edits inside values, and covering it (the
whole list, the references) where entities come, go or move."""

import copy
from pathlib import Path

import jsonpointer
import pytest
from hypothesis import HealthCheck, given, settings
from modelutil import load
from pycrdt import Array, Doc, Map
from test_model_prepare_along import FIXTURES, _patched, base_of, patches

from peerdaemon.core.events import EventLog
from peerdaemon.core.pointers import changed_paths
from peerdaemon.core.registry import Registry
from peerdaemon.model import ModelError, apply_environment, export_environment, prepare
from peerdaemon.store import Store

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=150,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


def _covered(path: str, by: list[str]) -> bool:
    return any(path == p or path.startswith(p + "/") or p == "" for p in by)


class Peer:
    """A registry holding one environment, and a peer replica that edits it as JSON."""

    def __init__(self, store: Store, name: str) -> None:
        env = copy.deepcopy(base_of(name))
        self.id = env["uuid"]
        self.registry = Registry(store, EventLog())
        self.registry.create(self.id, prepare(env, self.id)[0], "local")
        self.replica = Doc()
        self.replica.apply_update(self.registry.state_update(self.id))
        self.pushed: list[dict] = []
        self.registry.subscribe(self.id, self.pushed.append)

    def edit(self, ops: list) -> tuple[list[str], list[str]] | None:
        """The peer applies `ops` (as a whole-environment write) and the registry merges it:
        -> (the event's paths, the diff of the exports), or None if the edit is refused."""
        before = export_environment(self.replica, self.id)
        try:
            patched = _patched(before, ops)
            prepared = prepare(patched, self.id, before)[0]
        except ModelError:
            return None  # refused: no edit
        except Exception:
            return None  # a patch that does not apply
        state = self.replica.get_state()
        apply_environment(self.replica, prepared, old=before)
        update = self.replica.get_update(state)
        old = copy.deepcopy(self.registry.export(self.id))
        self.pushed.clear()
        self.registry.merge(self.id, update, "peer:p")
        if not self.pushed:
            return [], []
        (event,) = self.pushed
        assert event["type"] == "change", event
        return event["paths"], changed_paths(old, self.registry.export(self.id))


@settings(**SETTINGS)
@given(case=patches())
def test_event_paths_cover_the_diff_and_match_it_inside_values(tmp_path_factory, case):
    name, ops = case
    with Store.open(tmp_path_factory.mktemp("s")) as store:
        peer = Peer(store, name)
        out = peer.edit(ops)
        after = peer.registry.export(peer.id)
    if out is None:
        return
    paths, diff = out
    for path in diff:
        assert _covered(path, paths), (ops, paths, diff)
    if not any(isinstance(_at(after, p), list) for p in paths):
        # no list changed as a whole (entities, references, items that came or went): the
        # event says what the diff says (but for a value that exports as it was before:
        # repaired back to it, or a text rewritten alike)
        assert set(diff) <= set(paths), (ops, paths, diff)


def _at(env: dict, pointer: str):
    try:
        return jsonpointer.resolve_pointer(env, pointer)
    except jsonpointer.JsonPointerException:
        return None


EDITS = [
    ([{"op": "replace", "path": "/name", "value": "n"}], ["/name"]),
    ([{"op": "replace", "path": "/routes/2/endpoint", "value": "e"}], ["/routes/2/endpoint"]),
    (
        [{"op": "replace", "path": "/routes/3/responses/0/body", "value": "{}"}],
        ["/routes/3/responses/0/body"],
    ),
    (
        [{"op": "replace", "path": "/routes/1/responses/0/statusCode", "value": 418}],
        ["/routes/1/responses/0/statusCode"],
    ),
    (
        [{"op": "add", "path": "/routes/0/responses/0/headers/-", "value": {"key": "k"}}],
        ["/routes/0/responses/0/headers"],
    ),
    ([{"op": "replace", "path": "/headers/0/value", "value": "v"}], ["/headers/0/value"]),
    ([{"op": "replace", "path": "/tlsOptions/enabled", "value": True}], ["/tlsOptions/enabled"]),
    ([{"op": "remove", "path": "/routes/1/responses/0"}], ["/routes/1/responses"]),
    (
        [{"op": "copy", "from": "/routes/1/responses/0", "path": "/routes/1/responses/-"}],
        ["/routes/1/responses"],
    ),
    ([{"op": "move", "from": "/routes/0", "path": "/routes/2"}], ["/routes"]),
    ([{"op": "remove", "path": "/routes/2"}], ["/routes", "/rootChildren"]),
    ([{"op": "replace", "path": "/data/0/value", "value": "[]"}], ["/data/0/value"]),
]


@pytest.mark.parametrize(("ops", "expected"), EDITS)
def test_paths_of_a_peers_edit(tmp_path: Path, ops, expected):
    with Store.open(tmp_path) as store:
        peer = Peer(store, "test-env.json")
        paths, diff = peer.edit(ops)
    assert sorted(paths) == sorted(expected)
    assert all(_covered(p, paths) for p in diff)


def test_paths_of_a_peers_edit_on_a_replica_of_another_order(tmp_path: Path):
    """Indexes are the export's: a route that the peer moved first is at its new place."""
    with Store.open(tmp_path) as store:
        peer = Peer(store, "test-env.json")
        peer.edit([{"op": "move", "from": "/routes/4", "path": "/routes/0"}])
        routes = peer.registry.export(peer.id)["routes"]
        paths, diff = peer.edit([{"op": "replace", "path": "/routes/0/endpoint", "value": "x"}])
        assert paths == diff == ["/routes/0/endpoint"]
        assert peer.registry.export(peer.id)["routes"][0]["uuid"] == routes[0]["uuid"]


def test_a_new_environment_is_everything(tmp_path: Path):
    env = load("test-env.json")
    events = EventLog()
    with Store.open(tmp_path) as store:
        registry = Registry(store, events)
        doc = Doc()
        apply_environment(doc, prepare(env, env["uuid"])[0])
        registry.merge(env["uuid"], doc.get_update(), "peer:p")
    (changed,) = [e for e in events.since(0) if e["type"] == "environment-changed"]
    assert changed["data"]["paths"] == [""]


@pytest.mark.parametrize("name", FIXTURES)
def test_no_export_is_taken_for_a_merge(tmp_path: Path, monkeypatch, name):
    """A subscriber's event of a merged update costs the change, not two exports."""
    import peerdaemon.core.registry as registry_mod

    with Store.open(tmp_path) as store:
        peer = Peer(store, name)
        peer.registry.export(peer.id)
        exports = []
        real = registry_mod.export_environment
        monkeypatch.setattr(
            registry_mod, "export_environment", lambda *a: exports.append(1) or real(*a)
        )
        state = peer.replica.get_state()
        peer.replica.get("environment", type=Map)["name"] = "x"
        peer.registry.merge(peer.id, peer.replica.get_update(state), "peer:p")
        assert peer.pushed[-1]["paths"] == ["/name"]
        assert exports == []


def test_a_yjs_client_that_deletes_a_route_but_not_its_reference(tmp_path: Path):
    """The export mends the references (the route leaves rootChildren): reported too."""
    with Store.open(tmp_path) as store:
        peer = Peer(store, "test-env.json")
        old = copy.deepcopy(peer.registry.export(peer.id))
        state = peer.replica.get_state()
        order = peer.replica.get("routes.order", type=Array)
        uid = order[1]
        del order[1]
        del peer.replica.get("routes", type=Map)[uid]
        peer.registry.merge(peer.id, peer.replica.get_update(state), "peer:p")
        diff = changed_paths(old, peer.registry.export(peer.id))
    paths = peer.pushed[-1]["paths"]
    assert "/rootChildren" in diff or any(p.startswith("/rootChildren/") for p in diff)
    assert all(_covered(p, paths) for p in diff), (paths, diff)
