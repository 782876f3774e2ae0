"""The registry's rollback of a write that fails half-way, with changes still queued."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from modelutil import assert_strict_equal, load
from pycrdt import Doc, Map

from peerdaemon.core import registry as registry_mod
from peerdaemon.core.events import EventLog
from peerdaemon.core.registry import Registry
from peerdaemon.model import export_environment, prepare
from peerdaemon.store import Store


def half_then_fail(doc: Doc, env: object, old: object = None) -> None:
    with doc.transaction():
        doc.get("environment", type=Map)["name"] = "half-applied"
        raise RuntimeError("a bug, half-way through a write")


def test_rollback_keeps_changes_not_yet_committed(tmp_path: Path, monkeypatch) -> None:
    """The store's writer is not running, so every earlier change is only queued: the rolled
    back document still holds them all, and only them."""
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        env = load("test-env.json")
        e1 = env["uuid"]
        registry.create(e1, prepare(env, e1)[0], "local")
        edited = {**env, "name": "queued edit", "port": 4242}
        registry.apply(e1, prepare(edited, e1)[0], "local")
        sent: list[bytes] = []
        registry.add_listener(lambda env_id, update, origin: sent.append(update))

        with monkeypatch.context() as m:
            m.setattr(registry_mod, "apply_environment", half_then_fail)
            with pytest.raises(RuntimeError, match="half-way"):
                registry.apply(e1, prepare({**edited, "name": "x"}, e1)[0], "local")
        assert sent == []  # the half-done edit went nowhere
        assert_strict_equal(registry.export(e1), edited)
        assert_strict_equal(export_environment(registry.get(e1).doc, e1), edited)

        # the rebuilt document goes on: a later edit reaches a replica of the store's content
        registry.apply(e1, prepare({**edited, "latency": 7}, e1)[0], "local")
        replica = Doc()
        for update in store.updates_of(e1):
            replica.apply_update(update)
        assert_strict_equal(export_environment(replica, e1), {**edited, "latency": 7})
        assert len(sent) == 1


def header_writer(registry: Registry, env_id: str) -> Callable[..., bytes]:
    """Another client of `env_id`: `header(key, at=None)` inserts a header and returns that
    update alone, so a test that holds one back leaves a gap in the client's clocks."""
    writer = Doc()
    writer.apply_update(registry.state_update(env_id))
    headers = writer.get("environment", type=Map)["headers"]

    def header(key: str, at: int | None = None) -> bytes:
        before = writer.get_state()
        headers.insert(len(headers) if at is None else at, Map({"key": key, "value": "v"}))
        return writer.get_update(before)

    return header


def test_an_update_after_a_gap_in_clocks_is_kept_and_not_written_over(tmp_path: Path) -> None:
    """pycrdt (yrs) integrates an update that follows a gap in its client's clocks, shows its
    content, and reports no transaction update. The registry must still store it and must not
    export from a stale cache: a later local write would delete that content everywhere."""
    env = load("test-env.json")
    e1 = env["uuid"]
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        registry.create(e1, prepare(env, e1)[0], "local")
        header = header_writer(registry, e1)

        # "after-gap" goes in front: its neighbours are known, only its clock follows a gap
        first, skipped, after_gap = header("first"), header("skipped"), header("after-gap", 0)
        registry.merge(e1, first, "peer:w")
        stored = len(store.updates_of(e1))
        registry.merge(e1, first, "peer:v")  # the same update along another path: not stored
        assert len(store.updates_of(e1)) == stored
        registry.export(e1)  # the export is cached
        registry.merge(e1, after_gap, "peer:w")  # "skipped" has not arrived yet
        shown = [h["key"] for h in export_environment(registry.get(e1).doc, e1)["headers"]]
        assert "after-gap" in shown  # what yrs does (Yjs would wait for "skipped")
        assert [h["key"] for h in registry.export(e1)["headers"]] == shown

        # a local write from that export keeps what the document shows
        local = {**registry.export(e1), "port": 4242}
        registry.apply(e1, prepare(local, e1)[0], "local")
        registry.merge(e1, skipped, "peer:w")
        keys = [h["key"] for h in registry.export(e1)["headers"]]
        assert {"first", "skipped", "after-gap"} <= set(keys)

        replica = Doc()  # and the store holds all of it
        for update in store.updates_of(e1):
            replica.apply_update(update)
        assert export_environment(replica, e1) == registry.export(e1)


def test_an_update_after_a_gap_in_clocks_is_stored_as_soon_as_it_is_merged(tmp_path: Path) -> None:
    """The document shows an update that yrs integrated after a clock gap without reporting it
    (`Registry._keep_quiet_update`): the store must hold it right away, and the merge's ticket
    must be that write's, or what the document shows is lost at the next start."""
    env = load("test-env.json")
    e1 = env["uuid"]
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        registry.create(e1, prepare(env, e1)[0], "local")
        header = header_writer(registry, e1)

        header("skipped")  # never delivered: the clock gap
        after_gap = header("after-gap", 0)
        before = registry.get(e1).last_ticket
        _, changed, ticket = registry.merge(e1, after_gap, "peer:w")
        assert not changed, "yrs reported the update: this test no longer takes the quiet path"
        assert "after-gap" in [h["key"] for h in registry.export(e1)["headers"]]
        assert ticket is not None and ticket is not before

        replica = Doc()  # what the store holds (committed and queued) right after the merge
        for update in store.updates_of(e1):
            replica.apply_update(update)
        assert export_environment(replica, e1) == registry.export(e1)

    with Store.open(tmp_path) as store:  # and after a restart
        registry = Registry(store, EventLog())
        registry.load()
        assert "after-gap" in [h["key"] for h in registry.export(e1)["headers"]]


# -- a merge that was applied and queued succeeded, whatever its followers do ---------


def _edit(registry: Registry, env_id: str, **values: object) -> bytes:
    """A peer's Yjs update setting top-level values of the environment."""
    doc = Doc()
    doc.apply_update(registry.state_update(env_id))
    before = doc.get_state()
    top = doc.get("environment", type=Map)
    for key, value in values.items():
        top[key] = value
    return doc.get_update(before)


def _stored_export(tmp_path: Path, env_id: str) -> dict:
    """The environment as a restarted daemon reads it back from the store."""
    with Store.open(tmp_path) as store:
        doc = Doc()
        for update in store.load()[env_id].updates:
            doc.apply_update(update)
    return export_environment(doc, env_id)


def _errors(events: EventLog) -> list[dict]:
    return [e["data"] for e in events.since(0) if e["type"] == "environment-error"]


def _boom(*args: object) -> None:
    raise RuntimeError("a follower's bug")


def test_failing_listeners_and_subscribers_are_isolated_and_the_merge_succeeds(
    tmp_path: Path,
) -> None:
    env = load("test-env.json")
    e1 = env["uuid"]
    events = EventLog()
    with Store.open(tmp_path) as store:
        registry = Registry(store, events)
        registry.create(e1, prepare(env, e1)[0], "local")
        got: list[object] = []
        boom_listener = registry.add_listener(_boom)
        registry.add_listener(lambda env_id, update, origin: got.append(("listener", origin)))
        boom_subscriber = registry.subscribe(e1, _boom)
        registry.subscribe(e1, lambda event: got.append(("subscriber", event["paths"])))
        events.listen(_boom)  # a failing event-log listener too

        assert registry.merge(e1, _edit(registry, e1, name="merged"), "peer:p")[:2] == (False, True)
        assert registry.merge(e1, _edit(registry, e1, port=4242), "peer:p")[:2] == (False, True)
        assert got == [
            ("subscriber", ["/name"]),
            ("listener", "peer:p"),
            ("subscriber", ["/port"]),
            ("listener", "peer:p"),
        ]
        # each failing follower is the environment's error, reported once, not on every change
        errors = _errors(events)
        assert sorted(e["follower"] for e in errors) == ["listener _boom", "subscriber"]
        assert all(e["id"] == e1 and "a follower's bug" in e["reason"] for e in errors)
        changed = [e for e in events.since(0) if e["type"] == "environment-changed"]
        assert [e["data"]["paths"] for e in changed[-2:]] == [["/name"], ["/port"]]
        # the environment's state says so, until the failing followers are gone
        assert registry.summary(e1)["errors"] == sorted(e["reason"] for e in errors)
        registry.remove_listener(boom_listener)
        registry.unsubscribe(e1, boom_subscriber)
        assert "errors" not in registry.summary(e1)
    stored = _stored_export(tmp_path, e1)
    assert (stored["name"], stored["port"]) == ("merged", 4242)


def test_a_change_whose_event_cannot_be_built_gets_an_error_event(
    tmp_path: Path, monkeypatch
) -> None:
    """Telling the change's paths raises (content no environment can hold, or a bug): the
    merge is still a success, subscribers get an `error` push, the event log paths are ""."""
    env = load("test-env.json")
    e1 = env["uuid"]
    events = EventLog()
    with Store.open(tmp_path) as store:
        registry = Registry(store, events)
        registry.create(e1, prepare(env, e1)[0], "local")
        pushed: list[dict] = []
        registry.subscribe(e1, pushed.append)
        monkeypatch.setattr(registry_mod.Touched, "pointers", _boom)
        update = _edit(registry, e1, name="unreadable")
        assert registry.merge(e1, update, "local")[:2] == (False, True)
        ((push),) = pushed
        assert push["type"] == "error" and push["id"] == e1 and push["origin"] == "local"
        assert "a follower's bug" in push["reason"]
        (error,) = _errors(events)
        assert error["follower"] == "change event"
        assert events.since(0)[-1]["type"] == "environment-changed"
        assert events.since(0)[-1]["data"]["paths"] == [""]
        monkeypatch.undo()
    assert _stored_export(tmp_path, e1)["name"] == "unreadable"


def test_a_failing_compaction_does_not_fail_the_merge(tmp_path: Path, monkeypatch) -> None:
    env = load("test-env.json")
    e1 = env["uuid"]
    events = EventLog()
    with Store.open(tmp_path) as store:
        registry = Registry(store, events)
        registry.create(e1, prepare(env, e1)[0], "local")
        monkeypatch.setattr(store, "needs_compaction", lambda env_id: True)
        monkeypatch.setattr(store, "enqueue_compact", _boom)
        assert registry.merge(e1, _edit(registry, e1, latency=7), "local")[:2] == (False, True)
        assert [e["follower"] for e in _errors(events)] == ["compaction"]
    assert _stored_export(tmp_path, e1)["latency"] == 7


def test_content_the_export_cannot_read_merges_and_is_durable(tmp_path: Path) -> None:
    """The real case: a Y.XmlFragment in the `environment` map, merged while someone
    follows the environment. Whether the export reads it as absent or fails, the merge answers
    success and the update is in the store."""
    from pycrdt import XmlFragment

    env = load("test-env.json")
    e1 = env["uuid"]
    events = EventLog()
    with Store.open(tmp_path) as store:
        registry = Registry(store, events)
        registry.create(e1, prepare(env, e1)[0], "local")
        pushed: list[dict] = []
        registry.subscribe(e1, pushed.append)
        events.listen(lambda event: None)
        update = _edit(registry, e1, name="with xml", bad=XmlFragment())
        assert registry.merge(e1, update, "peer:p")[:2] == (False, True)
        assert [p["type"] for p in pushed] in (["change"], ["error"])
    with Store.open(tmp_path) as store:
        doc = Doc()
        for stored in store.load()[e1].updates:
            doc.apply_update(stored)
        assert doc.get("environment", type=Map)["name"] == "with xml"
        assert "bad" in doc.get("environment", type=Map)


@pytest.mark.parametrize(
    "hostile", [float("nan"), float("inf"), "33", [1, 2], {"a": 1}, True, 2**60]
)
def test_summary_of_any_last_migration(tmp_path, hostile):
    """What any client wrote as lastMigration leaves listings working (a Map or NaN once reached
    `env list` as is: not CBOR, or not JSON)."""
    import math

    from pycrdt import Array as YArray
    from pycrdt import Map as YMap

    from peerdaemon.model.layout import ENV_ROOT

    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        env = load("test-env.json")
        e1 = env["uuid"]
        registry.create(e1, prepare(env, e1)[0], "local")
        doc = registry.get(e1).doc
        other = Doc()
        other.apply_update(doc.get_update())
        top = other.get(ENV_ROOT, type=YMap)
        value = YArray(hostile) if isinstance(hostile, list) else hostile
        value = YMap(hostile) if isinstance(hostile, dict) else value
        top["lastMigration"] = value
        registry.merge(e1, other.get_update(doc.get_state()), "peer")
        summary = registry.summary(e1)
        last = summary["lastMigration"]
        assert (
            last is None
            or (type(last) is int and not isinstance(hostile, bool))
            or (type(last) is float and math.isfinite(last))
        )
        assert summary["newer"] in (True, False)


def test_the_model_version_read_follows_every_change_of_meta(tmp_path: Path) -> None:
    """`model_of` is remembered between changes (every update a link sends or receives asks
    it several times), and forgotten whenever the document's `meta` map changes: a peer's
    migrated update, a local migration, a reload."""
    from peerdaemon.model.migrations import META_ROOT, MODEL_KEY

    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog(), model_version=1)
        env = load("test-env.json")
        e1 = env["uuid"]
        registry.create(e1, prepare(env, e1)[0], "local")
        assert registry.model_of(e1) == 1
        registry.apply(e1, prepare({**env, "port": 4243}, e1)[0], "local")
        assert registry.model_of(e1) == 1  # an edit of the environment keeps it

        registry.model_version = 2  # this daemon, upgraded, migrates it
        registry.migrate(e1)
        assert registry.model_of(e1) == 2

        peer = Doc()  # a newer peer migrated it further: its update sets meta.model
        peer.apply_update(registry.state_update(e1))
        before = peer.get_state()
        peer.get(META_ROOT, type=Map)[MODEL_KEY] = 7
        registry.merge(e1, peer.get_update(before), "peer:x")
        assert registry.model_of(e1) == 7


def test_a_merge_reaches_its_subscribers_before_the_writer_wakes(tmp_path: Path) -> None:
    """A peer's update (the LAN hop): the change event goes out first, then the store's writer
    wakes, once, for what the merge queued (`Store.wake_after`)."""
    env = load("test-env.json")
    e1 = env["uuid"]
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        registry.create(e1, prepare(env, e1)[0], "local")
        wakes: list[int] = []
        notify = store._cond.notify
        store._cond.notify = lambda n=1: (wakes.append(n), notify(n))[1]  # type: ignore[method-assign]
        seen: list[int] = []
        registry.subscribe(e1, lambda event: seen.append(len(wakes)))
        registry.add_listener(lambda env_id, update, origin: seen.append(len(wakes)))
        registry.merge(e1, _edit(registry, e1, name="merged"), "peer:p")
        assert seen == [0, 0] and len(wakes) == 1
