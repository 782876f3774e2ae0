"""The mirror service in a real in-process daemon (`supervisor.serve`), on real files, through
the socket: document -> file, file -> document, conflicts, bad paths, restarts, --mirror-dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import until
from modelutil import FIXTURE_DIR

from peerdaemon.api.client import AsyncClient, DaemonError
from peerdaemon.daemon.supervisor import Daemon, DaemonConfig, serve
from peerdaemon.mirror.files import file_sig, write_if_unchanged
from peerdaemon.mirror.format import content_hash
from peerdaemon.mirror.settings import mirror_file_name

TEST_ENV = "test-env.json"  # written by Mockoon: the mirror reproduces it byte for byte


@pytest.fixture
def short_tmp():
    """Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="pdm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def daemon_at(root: Path, **options: Any) -> AsyncIterator[tuple[Daemon, AsyncClient]]:
    config = DaemonConfig(data_dir=root / "data", socket_path=root / "pd.sock", **options)
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(serve, config)
        async with await AsyncClient.connect(config.socket_path) as client:
            yield daemon, client
        nursery.cancel_scope.cancel()


def settled(runner: Any, path: Path) -> bool:
    """The link has looked at the file as it is now and has nothing left to do (no render,
    write, apply, retry or timer pending): until the file or the document changes again, it
    cannot act. What a "nothing happens" check waits for, instead of a fixed sleep."""
    try:
        sig = file_sig(path.stat())
    except OSError:
        return False
    m = runner.machine
    return m.sig == sig and m.state == "ok" and not m.want_observe and m.deadline() is None


def events(daemon: Daemon, type_: str) -> list[dict[str, Any]]:
    return [e["data"] for e in daemon.registry.events.since(0) if e["type"] == type_]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_as_editor(path: Path, env: Any, indent: int = 2) -> None:
    """What an editor does: write a temporary file, rename it over the original."""
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(json.dumps(env, indent=indent), encoding="utf-8")
    os.replace(tmp, path)


async def linked_fixture(client: AsyncClient, root: Path, name: str = TEST_ENV) -> tuple[str, Path]:
    path = root / "env.json"
    shutil.copy(FIXTURE_DIR / name, path)
    result = await client.call("env.import_link", json=path.read_text(), path=str(path))
    return result["id"], path


# -- document -> file ---------------------------------------------------------------------------


async def test_socket_edit_reaches_the_file_within_a_second_as_a_one_line_diff(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        before = path.read_text()
        assert before == (FIXTURE_DIR / TEST_ENV).read_text()  # nothing rewritten
        route = (await c.get(env_id))["routes"][0]
        start = trio.current_time()
        await c.patch(
            env_id,
            [
                {
                    "op": "replace",
                    "path": "/routes/0/responses/0/body",
                    "value": "hello from the socket",
                }
            ],
        )
        await until(lambda: "hello from the socket" in path.read_text(), 1.0, "the file")
        assert trio.current_time() - start < 1.0
        after = path.read_text()
        changed = [
            (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
        ]
        assert len(changed) == 1 and '"body": "hello from the socket"' in changed[0][1]
        assert read_json(path) == await c.get(env_id)
        links = await c.call("env.links")
        assert links[0]["id"] == env_id and links[0]["path"] == str(path)
        assert links[0]["stats"]["applies"] == 0 and route["uuid"]


async def test_merged_yjs_update_reaches_the_file(short_tmp):
    from pycrdt import Doc, Map, Text

    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        doc = Doc()
        doc.apply_update(await c.export(env_id, "yjs"))
        sv = doc.get_state()
        route_id = await c.get(env_id, "/routes/0/uuid")
        with doc.transaction():
            route = doc.get("routes", type=Map)[route_id]
            doc_text = route["documentation"]
            assert isinstance(doc_text, Text)
            doc_text += " (merged)"
        await c.merge(env_id, doc.get_update(sv))
        await until(lambda: "(merged)" in path.read_text(), 1.0, "the merged update in the file")


# -- file -> document ---------------------------------------------------------------------------


async def test_file_save_merges_with_a_concurrent_socket_edit(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        env = read_json(path)
        env["routes"][1]["responses"][0]["body"] = "typed in the editor"
        env["port"] = 4321
        save_as_editor(path, env)  # the editor saves the content it had...
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "renamed by a peer"}])
        # ...while the document changed elsewhere: both survive, in the document and the file
        await until(
            lambda: (
                (read_json(path) or {}).get("name") == "renamed by a peer"
                and read_json(path)["port"] == 4321
            ),
            3.0,
            "the merged file",
        )
        doc = await c.get(env_id)
        assert doc["name"] == "renamed by a peer" and doc["port"] == 4321
        assert doc["routes"][1]["responses"][0]["body"] == "typed in the editor"
        assert read_json(path) == doc
        changed = [e for e in events(daemon, "environment-changed") if e["origin"] == "file"]
        assert changed and all(e["id"] == env_id for e in changed)


async def test_file_save_made_from_an_older_copy_keeps_newer_edits_elsewhere(short_tmp):
    """Three-way: the daemon applies what the editor changed relative to the file it had, not
    the whole stale file, so an edit made elsewhere during a conflict survives the fix."""
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        old = read_json(path)
        path.write_text("{ half written", encoding="utf-8")
        await until(lambda: events(daemon, "mirror-conflict"), 3.0, "mirror-conflict")
        await c.patch(env_id, [{"op": "replace", "path": "/latency", "value": 250}])
        old["endpointPrefix"] = "v2"
        save_as_editor(path, old)  # the user restores the file and changes something
        await until(lambda: events(daemon, "mirror-resumed"), 3.0, "mirror-resumed")
        await until(
            lambda: (read_json(path) or {}).get("latency") == 250, 2.0, "merge written back"
        )
        doc = await c.get(env_id)
        assert doc["latency"] == 250 and doc["endpointPrefix"] == "v2"


async def test_no_ping_pong_with_a_reformatting_watcher(short_tmp):
    """A watcher that rewrites the file on every change (a formatter, a sync tool) must not set
    off a loop: reformatted content says nothing new, so it is neither applied nor rewritten."""
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        runner = daemon.mirror.links[env_id]
        rewrites = 0
        watched = path.stat().st_mtime_ns  # the file's mtime the watcher last dealt with

        async def watcher() -> None:
            nonlocal rewrites, watched
            while True:
                await trio.sleep(0.05)  # the watcher's own polling (not a wait of the test)
                mtime = path.stat().st_mtime_ns
                if mtime != watched:
                    env = read_json(path)
                    if env is not None:
                        save_as_editor(path, env, indent=4)
                        rewrites += 1
                    watched = path.stat().st_mtime_ns

        def quiet() -> bool:
            """The watcher has seen the file as it is, and the link has seen the watcher's
            rewrite and has nothing to do: from here nothing can move (a loop would not get
            here, or would show in the stats)."""
            return watched == path.stat().st_mtime_ns and settled(runner, path)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            for i in range(3):
                await c.patch(env_id, [{"op": "replace", "path": "/name", "value": f"edit {i}"}])
                await until(lambda i=i: (read_json(path) or {}).get("name") == f"edit {i}", 2.0)
                await until(quiet, 5.0, "the watcher and the link to settle")
            nursery.cancel_scope.cancel()
        stats = dict(runner.machine.stats)
        assert stats["writes"] == 3 and stats["applies"] == 0
        assert [e for e in events(daemon, "environment-changed") if e["origin"] == "file"] == []
        assert 1 <= rewrites <= 3
        assert (await c.get(env_id))["name"] == "edit 2"


async def test_each_external_save_is_applied_once(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        runner = daemon.mirror.links[env_id]
        for port in (4001, 4002, 4003):
            env = read_json(path)
            env["port"] = port
            save_as_editor(path, env)
            await until(lambda port=port: _equals(c.get(env_id, "/port"), port), 2.0)
        await until(lambda: settled(runner, path), 5.0, "the link to settle")
        assert runner.machine.stats["applies"] == 3
        assert runner.machine.stats["writes"] == 0  # the file already said it all
        from_file = [e for e in events(daemon, "environment-changed") if e["origin"] == "file"]
        assert len(from_file) == 3


def rewrite_keeping_the_stat(path: Path, old: bytes, new: bytes) -> None:
    """A second save within one timestamp tick: same size, same inode, same mtime."""
    assert len(old) == len(new) and old != new
    st = path.stat()
    with open(path, "r+b") as f:  # in place: the inode stays
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        st.st_size,
        st.st_ino,
        st.st_mtime_ns,
    )


async def test_a_save_that_keeps_the_stat_is_still_applied(short_tmp):
    """A file saved twice within its timestamp's granularity keeps its size, inode and mtime;
    while the mtime is that recent, the link compares the content too."""
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        await c.patch(env_id, [{"op": "replace", "path": "/port", "value": 3001}])
        await until(lambda: (read_json(path) or {}).get("port") == 3001, 2.0)
        runner = daemon.mirror.links[env_id]
        await until(lambda: settled(runner, path), 5.0, "the daemon's write seen, stat and all")
        old = path.read_bytes()
        rewrite_keeping_the_stat(path, old, old.replace(b'"port": 3001', b'"port": 3002'))
        await until(lambda: _equals(c.get(env_id, "/port"), 3002), 3.0, "the port from the file")


def test_a_write_does_not_replace_a_save_that_kept_the_stat(short_tmp):
    """The write side of the same race: the link's sig still matches, the content does not."""
    path = short_tmp / "env.json"
    path.write_bytes(b'{"port": 3001}')
    sig = file_sig(path.stat())
    rewrite_keeping_the_stat(path, b'{"port": 3001}', b'{"port": 3002}')
    known = content_hash(b'{"port": 3001}')
    outcome = write_if_unchanged(path, b'{"port": 9999}', sig, 0o022, known)
    assert outcome == ("changed", None, None) and path.read_bytes() == b'{"port": 3002}'
    outcome = write_if_unchanged(
        path, b'{"port": 9999}', sig, 0o022, content_hash(b'{"port": 3002}')
    )
    assert outcome[0] == "ok" and path.read_bytes() == b'{"port": 9999}'


# -- restarts -----------------------------------------------------------------------------------


async def test_links_survive_a_restart_and_offline_edits_are_picked_up(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
    env = read_json(path)
    env["routes"][0]["endpoint"] = "edited-while-stopped"
    save_as_editor(path, env)
    async with daemon_at(short_tmp) as (daemon, c):
        links = await c.call("env.links")
        assert [(x["id"], x["path"]) for x in links] == [(env_id, str(path))]
        await until(lambda: c.get(env_id, "/routes/0/endpoint"), 2.0)
        await until(
            lambda: _equals(c.get(env_id, "/routes/0/endpoint"), "edited-while-stopped"), 2.0
        )
        await c.patch(env_id, [{"op": "replace", "path": "/port", "value": 3999}])
        await until(lambda: (read_json(path) or {}).get("port") == 3999, 1.0)
    # unchanged file at restart: not applied, not rewritten
    mtime = path.stat().st_mtime_ns
    async with daemon_at(short_tmp) as (daemon, c):
        runner = daemon.mirror.links[env_id]
        await until(lambda: settled(runner, path), 5.0, "the link to settle")
        assert runner.machine.stats == {"writes": 0, "applies": 0, "conflicts": 0, "errors": 0}
        assert path.stat().st_mtime_ns == mtime


async def _equals(awaitable: Any, expected: Any) -> bool:
    return (await awaitable) == expected


async def _state(c: AsyncClient) -> str:
    return (await c.call("env.links"))[0]["state"]


async def test_pending_change_is_written_at_shutdown(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "last words"}])
    assert read_json(path)["name"] == "last words"


# -- invalid files ------------------------------------------------------------------------------


async def test_invalid_file_gets_a_conflict_file_and_resumes_when_valid(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        conflict = short_tmp / "env.peerdaemon-conflict.json"
        path.write_text('{"uuid": "x", "name": ', encoding="utf-8")  # half written
        await until(lambda: events(daemon, "mirror-conflict"), 3.0, "mirror-conflict")
        (event,) = events(daemon, "mirror-conflict")
        assert event["path"] == str(path) and event["conflict_path"] == str(conflict)
        assert "malformed JSON" in event["reason"]
        await until(conflict.exists, 1.0, "the conflict file")
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "during the conflict"}])
        await until(lambda: (read_json(conflict) or {}).get("name") == "during the conflict", 1.5)
        assert path.read_text() == '{"uuid": "x", "name": '  # never overwritten
        links = await c.call("env.links")
        assert links[0]["state"] == "conflict"
        env = read_json(conflict)
        env["port"] = 5050
        save_as_editor(path, env)  # the user fixes the file, from the conflict file
        await until(lambda: events(daemon, "mirror-resumed"), 3.0, "mirror-resumed")
        await until(lambda: _equals(c.get(env_id, "/port"), 5050), 2.0)
        assert (await c.get(env_id, "/name")) == "during the conflict"
        await c.patch(env_id, [{"op": "replace", "path": "/latency", "value": 9}])
        await until(lambda: (read_json(path) or {}).get("latency") == 9, 1.0, "normal mirroring")
        await until(lambda: _equals(_state(c), "ok"), 1.0, "state ok")


async def test_file_of_another_environment_is_not_applied(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        other = json.loads((FIXTURE_DIR / "callbacks.json").read_text())
        save_as_editor(path, other)
        await until(lambda: events(daemon, "mirror-conflict"), 3.0, "mirror-conflict")
        assert "another environment" in events(daemon, "mirror-conflict")[0]["reason"]
        assert (await c.get(env_id, "/name")) == "Test env"


# -- bad input ----------------------------------------------------------------------------------


async def test_unusable_paths_are_refused_at_link_time(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id = (await c.import_env((FIXTURE_DIR / TEST_ENV).read_text()))["id"]
        (short_tmp / "adir").mkdir()
        (short_tmp / "afile").write_text("x")
        (short_tmp / "junk.json").write_text("not json at all")
        cases = {
            str(short_tmp / "missing" / "env.json"): ("bad-path", "does not exist"),
            str(short_tmp / "adir"): ("bad-path", "is a directory"),
            str(short_tmp / "afile" / "env.json"): ("bad-path", "is not a folder"),
            str(short_tmp / "junk.json"): ("link-refused", "overwrite"),
            "relative.json": ("bad-request", "absolute"),
        }
        for path, (code, text) in cases.items():
            with pytest.raises(DaemonError) as err:
                await c.call("env.link", id=env_id, path=path)
            assert err.value.code == code and text in err.value.message, (path, err.value)
        with pytest.raises(DaemonError) as err:
            await c.call("env.link", id="no-such-env", path=str(short_tmp / "x.json"))
        assert err.value.code == "not-found"
        # overwrite replaces a file that is not this environment
        await c.call("env.link", id=env_id, path=str(short_tmp / "junk.json"), overwrite=True)
        assert read_json(short_tmp / "junk.json")["uuid"] == env_id
        assert (await c.status())["environments"] == 1


async def test_two_environments_cannot_share_a_file(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        other = (await c.import_env((FIXTURE_DIR / "callbacks.json").read_text()))["id"]
        with pytest.raises(DaemonError) as err:
            await c.call("env.link", id=other, path=str(path), overwrite=True)
        assert err.value.code == "link-conflict" and env_id in err.value.message
        with pytest.raises(DaemonError) as err:  # the same file through another spelling
            await c.call("env.link", id=other, path=str(short_tmp / "." / "env.json"))
        assert err.value.code == "link-conflict"
        with pytest.raises(DaemonError) as err:
            await c.call("env.import_link", json=path.read_text(), new_id=True, path=str(path))
        assert err.value.code == "link-conflict"
        assert len(await c.list_envs()) == 2  # the refused import created nothing
        # relinking an environment moves its link
        await c.call("env.link", id=env_id, path=str(short_tmp / "moved.json"))
        await c.call("env.link", id=other, path=str(path), overwrite=True)
        assert read_json(path)["uuid"] == other
        assert {x["id"]: x["path"] for x in await c.call("env.links")} == {
            env_id: str(short_tmp / "moved.json"),
            other: str(path),
        }


async def test_deleted_file_is_written_again_with_an_event(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        path.unlink()
        await until(path.exists, 2.0, "the file written again")
        (event,) = events(daemon, "mirror-file-deleted")
        assert "env unlink" in event["reason"]
        assert read_json(path) == await c.get(env_id)


async def test_file_replaced_by_a_directory_and_missing_folder(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        path.unlink()
        path.mkdir()
        await until(lambda: events(daemon, "mirror-error"), 2.0, "mirror-error")
        assert "is a directory" in events(daemon, "mirror-error")[0]["reason"]
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "still editable"}])
        assert path.is_dir() and (await c.status())["environments"] == 1
        path.rmdir()
        await until(lambda: (read_json(path) or {}).get("name") == "still editable", 4.0)
        await until(lambda: events(daemon, "mirror-resumed"), 1.0, "mirror-resumed")

        # the whole folder goes away: errors, retries, and the file comes back with the folder
        folder = short_tmp / "sub"
        folder.mkdir()
        sub_path = folder / "env.json"
        await c.call("env.link", id=env_id, path=str(sub_path))
        shutil.rmtree(folder)
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "folder gone"}])
        await until(
            lambda: [e for e in events(daemon, "mirror-error") if "does not exist" in e["reason"]],
            3.0,
            "the missing folder error",
        )
        assert (await c.get(env_id, "/name")) == "folder gone"
        links = await c.call("env.links")
        assert links[0]["state"] == "error" and "does not exist" in links[0]["error"]
        folder.mkdir()
        await until(lambda: (read_json(sub_path) or {}).get("name") == "folder gone", 5.0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
async def test_read_only_folder_is_refused_and_reported(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        ro = short_tmp / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(DaemonError) as err:
            await c.call("env.link", id=env_id, path=str(ro / "env.json"))
        assert err.value.code == "bad-path" and "permission denied" in err.value.message
        short_tmp.chmod(0o500)
        try:
            await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "x"}])
            await until(lambda: events(daemon, "mirror-error"), 3.0, "mirror-error")
            assert "permission denied" in events(daemon, "mirror-error")[0]["reason"]
        finally:
            short_tmp.chmod(0o700)


# -- unlink, import --link, --mirror-dir ---------------------------------------------------------


async def test_unlink_stops_mirroring(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        runner = daemon.mirror.links[env_id]
        result = await c.call("env.unlink", id=env_id)
        assert result == {"id": env_id, "path": str(path), "unlinked": True}
        assert runner.done.is_set()  # its task has ended: nothing is left to write the file
        before = path.read_text()
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "not mirrored"}])
        assert env_id not in daemon.mirror.links  # and the change started no new link
        assert path.read_text() == before and await c.call("env.links") == []
        with pytest.raises(DaemonError) as err:
            await c.call("env.unlink", id=env_id)
        assert err.value.code == "not-found"
    async with daemon_at(short_tmp) as (daemon, c):
        assert await c.call("env.links") == []


async def test_import_link_rewrites_a_repaired_or_renamed_file(short_tmp):
    async with daemon_at(short_tmp) as (daemon, c):
        path = short_tmp / "demo.json"
        shutil.copy(FIXTURE_DIR / "demo-api-generated-commons-9.9.0.json", path)
        result = await c.call("env.import_link", json=path.read_text(), path=str(path), new_id=True)
        assert result["repairs"] and result["path"] == str(path)
        on_disk = read_json(path)
        assert on_disk["uuid"] == result["id"]  # the new id, written back at once
        assert all(r.get("uuid") for r in on_disk["routes"])  # the repair too
        assert on_disk == await c.get(result["id"])


async def test_mirror_dir_mirrors_every_environment_under_stable_names(short_tmp):
    mirror = short_tmp / "mirror"
    async with daemon_at(short_tmp, mirror_dir=mirror) as (daemon, c):
        a = (await c.import_env((FIXTURE_DIR / TEST_ENV).read_text()))["id"]
        b = (await c.import_env((FIXTURE_DIR / "callbacks.json").read_text()))["id"]
        name_a = mirror_file_name("Test env", a)
        assert name_a == f"test-env-{a[:8]}.json"
        file_a = mirror / name_a
        await until(file_a.exists, 2.0, "the mirrored file")
        assert read_json(file_a) == await c.get(a)  # a new file: Mockoon's canonical key order
        assert list(read_json(file_a))[:3] == ["uuid", "lastMigration", "name"]
        await c.patch(a, [{"op": "replace", "path": "/name", "value": "Renamed"}])
        await until(lambda: (read_json(file_a) or {}).get("name") == "Renamed", 1.0)
        env = read_json(file_a)
        env["port"] = 6060
        save_as_editor(file_a, env)
        await until(lambda: _equals(c.get(a, "/port"), 6060), 2.0)
        await c.call("env.unlink", id=b)
        assert {x["id"] for x in await c.call("env.links")} == {a}
    async with daemon_at(short_tmp, mirror_dir=mirror) as (daemon, c):
        links = await c.call("env.links")
        assert [(x["id"], x["path"], x["auto"]) for x in links] == [(a, str(file_a), True)]
        name_b = mirror_file_name(
            json.loads((FIXTURE_DIR / "callbacks.json").read_text())["name"], b
        )
        assert sorted(p.name for p in mirror.iterdir()) == sorted([name_a, name_b])
        await c.delete(a)
        await until(lambda: events(daemon, "mirror-unlinked"), 1.0)
        assert await c.call("env.links") == [] and file_a.exists()  # the file is left
    async with daemon_at(short_tmp) as (daemon, c):  # without --mirror-dir: no mirroring
        assert await c.call("env.links") == []


async def test_a_bug_in_a_link_is_reported_and_the_link_recovers(short_tmp, monkeypatch):
    from peerdaemon.mirror import runner as mirror_runner

    real = mirror_runner.render_file
    calls = 0

    def flaky(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated bug")
        return real(*args)

    monkeypatch.setattr(mirror_runner, "RESTART_DELAY", 0.1)
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        monkeypatch.setattr(mirror_runner, "render_file", flaky)
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "after the bug"}])
        await until(lambda: events(daemon, "mirror-error"), 2.0, "mirror-error")
        assert "simulated bug" in events(daemon, "mirror-error")[0]["reason"]
        await until(lambda: (read_json(path) or {}).get("name") == "after the bug", 3.0)
        assert (await c.status())["environments"] == 1


async def test_permission_denied_on_write_is_reported_and_retried(short_tmp, monkeypatch):
    """The same as a read-only folder, for runs as root (which writes through permissions)."""
    import types

    from peerdaemon.core import files as core_files

    denied = True

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if denied:
            raise PermissionError(13, "Permission denied")
        return tempfile.mkstemp(*args, **kwargs)

    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        monkeypatch.setattr(core_files, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "kept"}])
        await until(lambda: events(daemon, "mirror-error"), 2.0, "mirror-error")
        (event,) = events(daemon, "mirror-error")
        assert event["reason"] == f"cannot write {path}: permission denied"
        assert (await c.get(env_id, "/name")) == "kept"
        denied = False
        await until(lambda: (read_json(path) or {}).get("name") == "kept", 3.0, "the retry")
        await until(lambda: events(daemon, "mirror-resumed"), 1.0, "mirror-resumed")
        assert events(daemon, "mirror-resumed")[-1]["after"] == "error"


# -- conflicts that end, and failures that stay one link's --------------------------------------


async def test_restoring_the_conflict_file_brings_the_link_back(short_tmp):
    """`cp NAME.peerdaemon-conflict.json NAME.json` restores exactly what the daemon last wrote:
    the link leaves the conflict, and later edits reach the file, not the conflict file."""
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        conflict = short_tmp / "env.peerdaemon-conflict.json"
        written = path.read_bytes()
        path.write_text('{"uuid": "x",\n "name": ', encoding="utf-8")
        await until(conflict.exists, 3.0, "the conflict file")
        (link,) = await c.call("env.links")
        assert link["state"] == "conflict"
        assert link["error"] is not None and "malformed JSON at line 2" in link["error"]
        assert str(conflict) in link["error"]
        assert conflict.read_bytes() == written  # the case: the very bytes of the last write
        shutil.copy(conflict, path)
        await until(lambda: _equals(_state(c), "ok"), 3.0, "state ok")
        assert events(daemon, "mirror-resumed")[-1]["after"] == "conflict"
        assert (await c.call("env.links"))[0]["error"] is None
        await c.patch(env_id, [{"op": "replace", "path": "/name", "value": "after the restore"}])
        await until(lambda: (read_json(path) or {}).get("name") == "after the restore", 2.0)
        assert read_json(conflict)["name"] != "after the restore"


async def _yjs_edit(c: AsyncClient, env_id: str, **values: Any) -> bytes:
    """A Yjs update setting top-level values, as a peer or `env merge` sends it."""
    from pycrdt import Doc, Map

    doc = Doc()
    doc.apply_update(await c.export(env_id, "yjs"))
    before = doc.get_state()
    top = doc.get("environment", type=Map)
    for key, value in values.items():
        top[key] = value
    return doc.get_update(before)


@pytest.fixture
def unexportable(monkeypatch):
    """`Registry.export` raises for the environment ids put in the returned set."""
    from peerdaemon.core.registry import Registry

    broken: set[str] = set()
    real = Registry.export

    def export(self: Registry, env_id: str) -> Any:
        if env_id in broken:
            raise ValueError(f"simulated: {env_id} has no Python equivalent")
        return real(self, env_id)

    monkeypatch.setattr(Registry, "export", export)
    return broken


async def _link_second(c: AsyncClient, root: Path) -> tuple[str, Path]:
    path = root / "other.json"
    shutil.copy(FIXTURE_DIR / TEST_ENV, path)
    result = await c.call("env.import_link", json=path.read_text(), path=str(path), new_id=True)
    return result["id"], path


async def test_an_environment_no_file_can_hold_is_its_links_error(short_tmp, unexportable):
    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        other_id, other = await _link_second(c, short_tmp)
        before = path.read_bytes()
        unexportable.add(env_id)
        result = await c.merge(env_id, await _yjs_edit(c, env_id, name="unwritable"))
        assert result == {"created": False, "changed": True}
        await until(lambda: events(daemon, "mirror-error"), 3.0, "mirror-error")
        (event,) = events(daemon, "mirror-error")
        assert event["id"] == env_id and "simulated" in event["reason"]
        links = {link["id"]: link for link in await c.call("env.links")}
        assert links[env_id]["state"] == "error" and "simulated" in links[env_id]["error"]
        assert path.read_bytes() == before  # the file keeps its last good content
        # the other link goes on
        await c.patch(other_id, [{"op": "replace", "path": "/name", "value": "still mirrored"}])
        await until(lambda: (read_json(other) or {}).get("name") == "still mirrored", 2.0)
        # readable again: the link writes the change and resumes
        unexportable.clear()
        await until(lambda: (read_json(path) or {}).get("name") == "unwritable", 20.0)
        await until(lambda: _equals(_link_state(c, env_id), "ok"), 2.0, "state ok")
        resumed = events(daemon, "mirror-resumed")[-1]
        assert resumed == {"id": env_id, "path": str(path), "after": "error"}


async def _link_state(c: AsyncClient, env_id: str) -> str | None:
    return next((link["state"] for link in await c.call("env.links") if link["id"] == env_id), None)


async def test_a_failing_flush_at_unlink_is_reported_and_unlink_answers(
    short_tmp, unexportable, monkeypatch
):
    """The flush at unlink runs outside the link's supervised loop (it once crashed the daemon):
    with a change pending that cannot be rendered, unlink answers and the failure is an event."""
    from peerdaemon.mirror import link as link_mod

    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        other_id, other = await _link_second(c, short_tmp)
        monkeypatch.setattr(link_mod, "DEBOUNCE", 3600.0)  # changes stay pending until a flush
        monkeypatch.setattr(link_mod, "MAX_DELAY", 3600.0)
        unexportable.add(env_id)
        await c.merge(env_id, await _yjs_edit(c, env_id, name="pending"))
        result = await c.call("env.unlink", id=env_id)
        assert result["unlinked"] is True
        (event,) = events(daemon, "mirror-error")
        assert event["id"] == env_id and "simulated" in event["reason"]
        assert [link["id"] for link in await c.call("env.links")] == [other_id]
        assert (await c.status())["environments"] == 2


async def test_a_failing_flush_at_shutdown_stops_cleanly_and_other_links_flush(
    short_tmp, unexportable, monkeypatch
):
    from peerdaemon.mirror import link as link_mod

    async with daemon_at(short_tmp) as (daemon, c):
        env_id, path = await linked_fixture(c, short_tmp)
        other_id, other = await _link_second(c, short_tmp)
        before = path.read_bytes()
        monkeypatch.setattr(link_mod, "DEBOUNCE", 3600.0)
        monkeypatch.setattr(link_mod, "MAX_DELAY", 3600.0)
        unexportable.add(env_id)
        await c.merge(env_id, await _yjs_edit(c, env_id, name="pending"))
        await c.patch(other_id, [{"op": "replace", "path": "/name", "value": "flushed"}])
        assert read_json(other)["name"] != "flushed"  # pending
    # daemon_at returned: the daemon stopped without an error, and flushed the other link
    assert read_json(other)["name"] == "flushed"
    assert path.read_bytes() == before
    assert [e["id"] for e in events(daemon, "mirror-error")] == [env_id]
