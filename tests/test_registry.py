"""The registry's rollback of a write that fails half-way, with changes still queued."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelutil import assert_strict_equal, load
from pycrdt import Doc, Map

from peerdaemon.daemon import registry as registry_mod
from peerdaemon.daemon.events import EventLog
from peerdaemon.daemon.registry import Registry
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


def test_an_update_after_a_gap_in_clocks_is_kept_and_not_written_over(tmp_path: Path) -> None:
    """pycrdt (yrs) integrates an update that follows a gap in its client's clocks, shows its
    content, and reports no transaction update. The registry must still store it and must not
    export from a stale cache: a later local write would delete that content everywhere."""
    env = load("test-env.json")
    e1 = env["uuid"]
    with Store.open(tmp_path) as store:
        registry = Registry(store, EventLog())
        registry.create(e1, prepare(env, e1)[0], "local")
        writer = Doc()
        writer.apply_update(registry.state_update(e1))
        headers = writer.get("environment", type=Map)["headers"]

        def header(key: str, at: int | None = None) -> bytes:
            before = writer.get_state()
            headers.insert(len(headers) if at is None else at, Map({"key": key, "value": "v"}))
            return writer.get_update(before)

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
