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
