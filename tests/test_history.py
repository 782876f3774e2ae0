"""History, restore and the trash (core/history.py, docs/history.md): the policy's functions,
the store's tables and their upgrade, the socket operations on an in-process daemon, every
deletion path into the trash (a local delete, a space member's delete over a LAN link), the
CLI, and a real daemon killed with -9 that finds it all again."""

from __future__ import annotations

import copy
import json
import sqlite3
import time
from pathlib import Path

import pytest
import trio
from daemonproc import Daemons, daemons_fixture, pd  # noqa: F401 (the `daemons` fixture)
from daemonutil import (  # noqa: F401 (fixtures)
    InProcessDaemon,
    absent,
    base_fixture,
    converged,
    devs_fixture,
    file_config,
    make_space,
)
from helpers import run_cli, until, until_sync
from modelutil import load

from peerdaemon.api.client import DaemonError
from peerdaemon.core.history import (
    HistorySettings,
    canonical,
    pack,
    prunable,
    removed_share,
    summarize,
    unpack,
)
from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.store import HistoryRow, Store

ENV = "test-env.json"
FAST = {"interval": 0.2}


# -- the policy -----------------------------------------------------------------------------
def test_summary_names_what_changed():
    old = load(ENV)
    new = copy.deepcopy(old)
    new["routes"].append({**copy.deepcopy(old["routes"][0]), "uuid": "new-1"})
    new["routes"].append({**copy.deepcopy(old["routes"][0]), "uuid": "new-2"})
    new["routes"][1]["endpoint"] = "changed"
    del new["data"][0]
    new["name"] = "Renamed"
    assert summarize(old, new) == "+2 routes, 1 route changed, -1 data bucket, name"
    assert summarize(None, new) == "first version"
    assert summarize(old, copy.deepcopy(old)) == "no change"


def test_removed_share_counts_routes_responses_and_buckets():
    old = load(ENV)  # 11 routes with one response each, 2 data buckets: 24 entities
    new = copy.deepcopy(old)
    assert removed_share(old, new) == 0
    new["routes"] = new["routes"][:3]
    assert removed_share(old, new) == pytest.approx(16 / 24)
    assert removed_share({"routes": []}, new) == 0  # nothing to remove


def test_retention_by_age_and_count_keeps_the_newest():
    now = 1_000_000.0
    settings = HistorySettings(keep_days=1, keep_count=3)

    def row(env: str, version: int, age_days: float) -> HistoryRow:
        return HistoryRow(env, version, now - age_days * 86400, "interval", {}, b"", 1)

    rows = [row("a", v, 5 - v) for v in range(1, 6)]  # ages 4, 3, 2, 1, 0 days
    rows += [row("b", 1, 10)]  # old, but b's newest
    rows += [row("gone", 1, 10), row("gone", 2, 0.5)]
    out = prunable(rows, now, settings, alive=lambda e: e != "gone")
    assert out == {"a": [1, 2, 3], "gone": [1]}
    # a deleted environment's newest version goes with age too
    assert prunable(rows, now + 86400, settings, alive=lambda e: e != "gone")["gone"] == [1, 2]


def test_canonical_json_survives_packing():
    env = load(ENV)
    assert unpack(pack(canonical(env))) == env
    assert canonical(dict(reversed(env.items()))) == canonical(env)


# -- the store ----------------------------------------------------------------------------
def test_a_version_1_data_dir_is_upgraded_and_keeps_its_environments(tmp_path):
    db = sqlite3.connect(tmp_path / "peerdaemon.sqlite3")
    from peerdaemon.store.sqlite import _SCHEMA_V1

    db.executescript(_SCHEMA_V1)
    db.execute("INSERT INTO log (seq, env_id, blob) VALUES (1, 'e', x'0000')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Store.open(tmp_path) as store:
        assert store.load()["e"].updates == [b"\x00\x00"]
        assert store.history_rows() == [] and store.trash_rows() == []
        version = sqlite3.connect(tmp_path / "peerdaemon.sqlite3").execute("PRAGMA user_version")
        assert version.fetchone()[0] == 2


async def test_store_rows_are_durable_and_ordered(tmp_path):
    store = Store.open(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        store.enqueue_version("e", 1, 10.0, "first", {"devices": ["d"]}, b"h1", b"one")
        store.enqueue_version("e", 2, 20.0, "interval", {}, b"h2", b"two")
        store.enqueue_trash("x", 30.0, {"name": "X"}, b"gone")
        await store.enqueue_prune("e", [1]).wait()
        nursery.cancel_scope.cancel()
    store.close()
    with Store.open(tmp_path) as store:
        [row] = store.history_rows("e")
        assert (row.version, row.reason, row.digest, row.size) == (2, "interval", b"h2", 3)
        assert store.history_heads() == {"e": (2, b"h2")}
        assert store.history_blob("e", 2) == b"two" and store.history_blob("e", 1) is None
        [trashed] = store.trash_rows()
        assert (trashed.env_id, trashed.info, store.trash_blob("x")) == (
            "x",
            {"name": "X"},
            b"gone",
        )


async def test_a_migration_is_preceded_by_a_version_of_what_it_rewrites(tmp_path):
    from peerdaemon.core.events import EventLog
    from peerdaemon.core.history import History
    from peerdaemon.core.registry import Registry
    from peerdaemon.model import MODEL_VERSION, prepare

    if MODEL_VERSION < 2:
        pytest.skip("no migration to run")
    store = Store.open(tmp_path)
    registry = Registry(store, EventLog(), model_version=MODEL_VERSION - 1)
    history = History(registry, store, "DEVICE")
    history.attach()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        prepared, _ = prepare(load(ENV))
        env_id = prepared["uuid"]
        registry.create(env_id, prepared, "local")
        assert history.take_due(time.time()) == 1  # first
        renamed = {**prepared, "name": "not yet a version"}
        registry.apply(env_id, renamed, "local")
        registry.model_version = MODEL_VERSION
        assert registry.migrate(env_id) is not None
        await history.settled()
        found = history.versions(env_id)
        assert [(v["reason"], v["summary"]) for v in found] == [
            ("first", "first version"),
            ("migration", "name"),
        ]
        assert history.at(env_id, 2)["name"] == "not yet a version"
        nursery.cancel_scope.cancel()
    store.close()


# -- an in-process daemon ---------------------------------------------------------------------
async def start(base: Path, nursery: trio.Nursery, name: str = "a", **history) -> InProcessDaemon:
    d = InProcessDaemon(base, name)
    config = DaemonConfig(d.data_dir, d.socket_path, history={**FAST, **history})
    await d.start_with(nursery, config)
    return d


async def versions(d: InProcessDaemon, env_id: str, count: int | None = None) -> list[dict]:
    async def probe() -> list[dict] | None:
        found = (await d.op("env.history", id=env_id))["versions"]
        return found if count is None or len(found) >= count else None

    return await until(probe, what=f"{count} versions of {env_id}")


async def test_the_loop_takes_a_version_after_an_interval_of_changes(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "Renamed"}])
    found = await versions(d, env_id, 2)
    assert (found[1]["reason"], found[1]["summary"]) == ("interval", "name")
    assert found[1]["time"] - found[0]["time"] >= 0.2


async def test_versions_over_time_show_and_restore(base, nursery):
    d = await start(base, nursery, interval=3600.0)  # the test takes interval versions itself
    env_id = (await d.client.import_env(load(ENV)))["id"]
    [first] = await versions(d, env_id, 1)
    assert (first["version"], first["reason"], first["summary"]) == (1, "first", "first version")
    assert first["devices"] == [d.daemon.identity.device_id]
    original = await d.client.export(env_id)

    for i in range(3):  # a burst of edits within one interval: one version
        await d.client.patch(
            env_id, [{"op": "replace", "path": "/routes/0/endpoint", "value": f"e{i}"}]
        )
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "Renamed"}])
    assert d.daemon.history.take_due(time.time()) == 0  # within the interval
    assert d.daemon.history.take_due(time.time() + 3600) == 1
    found = await versions(d, env_id, 2)
    assert [v["reason"] for v in found] == ["first", "interval"]
    assert found[1]["summary"] == "1 route changed, name"
    edited = await d.client.export(env_id)
    assert await d.op("env.at", id=env_id, version=2) == edited
    assert await d.op("env.at", id=env_id, version=1) == original

    result = await d.op("env.restore", id=env_id, version=1)
    assert result == {"restored": 1, "changed": True}
    assert await d.client.export(env_id) == original
    found = await versions(d, env_id)
    # the state before the restore is version 2 already: no `restore` version of it
    assert [(v["version"], v["reason"]) for v in found] == [
        (1, "first"),
        (2, "interval"),
        (3, "restored"),
    ]
    assert found[-1]["note"] == "version 1" and found[-1]["summary"] == "1 route changed, name"
    # restoring the version it is now changes nothing
    assert (await d.op("env.restore", id=env_id, version=3))["changed"] is False
    # an edit not yet in a version is kept as one before a restore replaces it
    await d.client.patch(env_id, [{"op": "replace", "path": "/port", "value": 4000}])
    await d.op("env.restore", id=env_id, version=2)
    found = await versions(d, env_id)
    assert [(v["version"], v["reason"], v["summary"]) for v in found[3:]] == [
        (4, "restore", "port"),
        (5, "restored", "1 route changed, name, port"),
    ]
    assert (await d.op("env.at", id=env_id, version=4))["port"] == 4000

    for op, args, code in [
        ("env.at", {"id": env_id, "version": 99}, "not-found"),
        ("env.at", {"id": env_id, "version": 0}, "bad-request"),
        ("env.at", {"id": env_id, "version": "1"}, "bad-request"),
        ("env.restore", {"id": "nope", "version": 1}, "not-found"),
        ("env.history", {"id": "nope"}, "not-found"),
        ("env.untrash", {"id": "nope"}, "not-found"),
    ]:
        with pytest.raises(DaemonError) as info:
            await d.op(op, **args)
        assert info.value.code == code, (op, args)


async def test_a_put_that_removes_most_content_is_preceded_by_a_version(base, nursery):
    d = await start(base, nursery, interval=3600.0)  # no interval versions in this test
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    env = await d.client.export(env_id)
    env["routes"][0]["endpoint"] = "kept"
    await d.client.put(env_id, env)  # removes nothing: no version
    before = await d.client.export(env_id)
    small = copy.deepcopy(before)
    small["routes"] = small["routes"][:3]
    await d.client.put(env_id, small)
    found = await versions(d, env_id, 2)
    assert [v["reason"] for v in found] == ["first", "put"]
    assert found[1]["note"] == "removed 67% of its entities"
    assert await d.op("env.at", id=env_id, version=2) == before


async def test_a_linked_file_save_that_removes_most_content_is_preceded_by_a_version(base, nursery):
    """A save through a linked file arrives as a merge (mirror/runner.py), not a put: history
    sees it all the same."""
    d = await start(base, nursery, interval=3600.0)
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    path = base / "linked.json"
    await d.op("env.link", id=env_id, path=str(path))
    await until(lambda: path.exists() or None, what="the linked file written")
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "Renamed"}])
    await until(lambda: "Renamed" in path.read_text() or None, what="the file rendered")
    before = await d.client.export(env_id)
    small = json.loads(path.read_text())
    small["routes"] = small["routes"][:3]
    path.write_text(json.dumps(small, indent=2))

    async def saved() -> bool | None:
        return len((await d.client.export(env_id))["routes"]) == 3 or None

    await until(saved, what="the save applied")
    found = await versions(d, env_id, 2)
    assert [v["reason"] for v in found] == ["first", "put"]
    assert found[1]["note"] == "removed 67% of its entities"
    assert await d.op("env.at", id=env_id, version=2) == before


async def test_a_checkpoint_of_another_content_keeps_the_documents_changes_waiting(base, nursery):
    """As a resolve calls it: the side that loses is kept, and the document's own changes not
    yet in a version still become one."""
    d = await start(base, nursery, interval=3600.0)
    history = d.daemon.history
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "local"}])
    remote = {**await d.client.export(env_id), "name": "remote"}
    assert history.checkpoint(env_id, "resolve", state=remote, note="the remote side") is not None
    assert history.take_due(time.time() + 3600) == 1
    found = await versions(d, env_id, 3)
    assert [(v["reason"], v["note"]) for v in found] == [
        ("first", None),
        ("resolve", "the remote side"),
        ("interval", None),
    ]
    assert found[2]["devices"] == [d.daemon.identity.device_id]
    assert (await d.op("env.at", id=env_id, version=2))["name"] == "remote"
    assert (await d.op("env.at", id=env_id, version=3))["name"] == "local"


async def test_delete_goes_to_the_trash_and_untrash_brings_it_back(base, nursery):
    d = await start(base, nursery)
    env_id = (await d.client.import_env(load(ENV)))["id"]
    content = await d.client.export(env_id)
    await d.client.delete(env_id)
    [entry] = await d.op("env.trash")
    assert (entry["id"], entry["name"], entry["routes"], entry["origin"]) == (
        env_id,
        "Test env",
        11,
        "local",
    )
    assert entry["expires"] == pytest.approx(entry["deleted"] + 30 * 86400)

    # the same id imported again: untrash refuses to replace it, and --new-id puts it beside
    await d.client.import_env(load(ENV))
    with pytest.raises(DaemonError) as info:
        await d.op("env.untrash", id=env_id)
    assert info.value.code == "exists" and "new_id" in info.value.message
    result = await d.op("env.untrash", id=env_id, new_id=True)
    assert result["from"] == env_id and result["id"] != env_id
    assert await d.client.export(result["id"]) == {**content, "uuid": result["id"]}
    assert await d.op("env.trash") == []

    await d.client.delete(env_id)
    assert (await d.op("env.untrash", id=env_id))["id"] == env_id
    assert await d.client.export(env_id) == content
    found = await versions(d, env_id)  # (a version with that content exists: none added)
    assert await d.op("env.at", id=env_id, version=found[-1]["version"]) == content
    [new] = await versions(d, result["id"])
    assert (new["reason"], new["note"]) == ("untrashed", f"from the trash as {result['id']}")


async def test_retention_prunes_versions_and_expired_trash(base, nursery):
    d = await start(base, nursery, keep_count=2, trash_days=1, interval=3600.0)
    history = d.daemon.history
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    for i in range(4):
        await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": f"n{i}"}])
        assert history.take_due(time.time() + 3600) == 1
    gone = (await d.client.import_env(load(ENV), new_id=True))["id"]
    await d.client.delete(gone)
    await history.settled()
    assert history.prune(time.time()) == 3  # versions 1..3
    await history.settled()  # (a pass reads committed rows)
    assert history.prune(time.time() + 2 * 86400) == 1  # the trash entry expired
    await history.settled()
    assert [v["version"] for v in await versions(d, env_id)] == [4, 5]
    assert await d.op("env.trash") == []


async def test_history_survives_a_restart_and_takes_what_changed_meanwhile(base, nursery):
    d = await start(base, nursery, interval=3600.0)
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "late"}])
    await d.stop()  # before the interval: the change is not a version yet
    config = DaemonConfig(d.data_dir, d.socket_path, history={"interval": 3600.0})
    await d.start_with(nursery, config)
    d.daemon.history.take_due(time.time() + 3600)
    found = await versions(d, env_id, 2)
    assert found[1]["summary"] == "name"


async def test_history_off_keeps_no_versions_but_keeps_the_trash(base, nursery):
    d = await start(base, nursery, enabled=False)
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "x"}])
    d.daemon.history.take_due(time.time() + 10)
    assert (await d.op("env.history", id=env_id))["versions"] == []
    await d.client.delete(env_id)
    assert [e["id"] for e in await d.op("env.trash")] == [env_id]


async def test_a_space_members_delete_goes_to_the_trash_too(devs, nursery):
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery, a)
    space_id = await make_space(a, b)
    env_id = await a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    content = await converged([a, b], env_id)
    await a.client.delete(env_id)  # a shared environment: deleted in the space, on b too
    [entry] = await a.op("env.trash")
    assert (entry["id"], entry["origin"]) == (env_id, "local")
    await until(lambda: absent(b, env_id), what="the delete to reach b")
    [entry] = await b.op("env.trash")
    assert entry["id"] == env_id and entry["origin"] == f"peer:{a.device}"
    assert (await b.op("env.untrash", id=env_id))["id"] == env_id
    assert await b.export(env_id) == content
    assert env_id not in {e["id"] for s in await b.op("space.list") for e in s["environments"]}


async def test_cli_history_show_restore_trash_untrash(base, nursery, capsys, fixture_dir):
    d = await start(base, nursery)
    sock = ["--socket", str(d.socket_path)]
    env_id = (await d.client.import_env(load(ENV)))["id"]
    await versions(d, env_id, 1)
    await d.client.patch(env_id, [{"op": "replace", "path": "/name", "value": "Renamed"}])
    await versions(d, env_id, 2)

    assert await run_cli(*sock, "env", "history", "Renamed") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VERSION", "TIME", "REASON", "BY", "CHANGES"]
    assert lines[1].split()[0] == "1" and "first" in lines[1] and "this device" in lines[1]
    assert lines[2].split()[0] == "2" and lines[2].rstrip().endswith("name")
    assert await run_cli(*sock, "env", "history", env_id, "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["versions"]) == 2

    assert await run_cli(*sock, "env", "show", env_id, "--at", "1") == 0
    assert json.loads(capsys.readouterr().out)["name"] == "Test env"
    assert await run_cli(*sock, "env", "show", env_id, "--at", "9") == 1
    assert "no version 9 (versions 1..2)" in capsys.readouterr().err
    assert await run_cli(*sock, "env", "restore", env_id, "1") == 0
    assert (await d.client.export(env_id))["name"] == "Test env"

    assert await run_cli(*sock, "env", "delete", env_id) == 0
    assert await run_cli(*sock, "env", "trash") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "NAME", "ROUTES", "DELETED", "EXPIRES", "BY"]
    assert out[1].startswith(env_id)
    assert await run_cli(*sock, "env", "import", str(fixture_dir / ENV)) == 0
    capsys.readouterr()
    assert await run_cli(*sock, "env", "untrash", env_id[:8]) == 1
    err = capsys.readouterr().err
    assert "exists again" in err and "--new-id" in err and err.count("\n") == 1
    assert await run_cli(*sock, "env", "untrash", env_id[:8], "--new-id") == 0
    new_id = capsys.readouterr().out.strip()
    assert new_id != env_id and (await d.client.export(new_id))["name"] == "Test env"


async def test_settings_are_checked_and_apply_while_running(base, nursery, tmp_path):
    from peerdaemon.daemon.config import ConfigFileError, load

    with pytest.raises(ConfigFileError, match="history.put_threshold.*between 0 and 1"):
        load(None, environ={"PEERDAEMON_HISTORY_PUT_THRESHOLD": "2"})
    with pytest.raises(ConfigFileError, match="history.keep_days"):
        load(None, environ={"PEERDAEMON_HISTORY_KEEP_DAYS": "0"})
    path = tmp_path / "config.toml"
    path.write_text("[history]\ninterval = 60\nkeep_count = 7\n")
    d = InProcessDaemon(base, "a")
    await d.start_with(nursery, file_config(d, path))
    settings = d.daemon.history.settings
    assert (settings.interval, settings.keep_count, settings.trash_days) == (60, 7, 30)
    await d.op("config.set", key="history.trash_days", value="2")
    assert d.daemon.history.settings.trash_days == 2
    assert d.daemon.history.settings.keep_count == 7


# -- a real daemon, killed -----------------------------------------------------------------
def test_history_restore_and_trash_survive_kill_9(daemons: Daemons, fixture_dir):
    config = daemons.path("config.toml")
    config.write_text("[history]\ninterval = 0.3\n")
    d = daemons.new()
    d.argv[3:3] = ["--config", str(config)]
    d.start()
    sock = d.socket_path
    env_id = pd(sock, "env", "import", str(fixture_dir / ENV)).strip()
    other = pd(sock, "env", "import", "--new-id", str(fixture_dir / ENV)).strip()
    with d.client() as c:
        original = c.export(env_id)
        until_sync(lambda: len(c.call("env.history", id=env_id)["versions"]) == 1)
        c.patch(env_id, [{"op": "replace", "path": "/name", "value": "Edited"}])
        until_sync(lambda: len(c.call("env.history", id=env_id)["versions"]) == 2)
        c.call("env.restore", id=env_id, version=1)  # acknowledged: durable
        c.delete(other)
        listed = c.call("env.history", id=env_id)["versions"]
    d.kill9()
    d.start()
    with d.client() as c:
        assert c.call("env.history", id=env_id)["versions"] == listed
        assert [v["reason"] for v in listed] == ["first", "interval", "restored"]
        assert c.export(env_id) == original
        assert c.call("env.at", id=env_id, version=2)["name"] == "Edited"
        assert [e["id"] for e in c.call("env.trash")] == [other]
        assert c.call("env.untrash", id=other)["id"] == other
        assert c.export(other)["routes"] == original["routes"]
    d.stop()
