"""A document failing locally (docs/peer-protocol.md section 5) with real daemon processes:
content no file can hold, merged with `peerdaemon env merge` into environments linked to files,
never stops the daemon: unlink answers, SIGTERM ends it with exit code 0, and what was merged is
kept."""

from __future__ import annotations

import shutil
import subprocess

from daemonproc import PYTHON, Daemons, child_env, daemons_fixture  # noqa: F401
from modelutil import FIXTURE_DIR
from pycrdt import Doc, Map, XmlFragment

CLI_TIMEOUT = 30


def bad_update(state: bytes, key: str, depth: int = 0) -> bytes:
    """A Yjs update putting at `environment[key]` a Y.XmlFragment, or Y.Maps nested `depth`
    deep: the content a user once merged that no file could hold."""
    doc = Doc()
    doc.apply_update(state)
    before = doc.get_state()
    top = doc.get("environment", type=Map)
    if not depth:
        top[key] = XmlFragment(["text"])
    else:
        inner = top[key] = Map()
        for _ in range(depth):
            inner["m"] = Map()
            inner = inner["m"]
    return doc.get_update(before)


def test_bad_content_in_linked_environments_neither_crashes_unlink_nor_sigterm(
    daemons: Daemons,
) -> None:
    d = daemons.new()
    d.start()
    paths = [daemons.path(f"env{i}.json") for i in range(2)]
    ids = []
    with d.client() as c:
        for i, path in enumerate(paths):
            shutil.copy(FIXTURE_DIR / "test-env.json", path)
            args = {"new_id": True} if i else {}
            result = c.call("env.import_link", json=path.read_text(), path=str(path), **args)
            ids.append(result["id"])
        updates = [
            bad_update(c.export(ids[0], "yjs"), "fragment"),
            bad_update(c.export(ids[1], "yjs"), "deep", depth=1200),
        ]
    for env_id, update in zip(ids, updates, strict=True):
        update_file = daemons.path(f"{env_id}.yjs")
        update_file.write_bytes(update)
        merged = subprocess.run(
            [PYTHON, "-m", "peerdaemon", "--socket", str(d.socket_path), "env", "merge"]
            + [env_id, str(update_file)],
            capture_output=True,
            env=child_env(),
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert merged.returncode == 0, merged.stderr.decode()  # stored and applied: a success
    with d.client() as c:
        assert c.call("env.unlink", id=ids[0])["unlinked"] is True
        assert c.status()["environments"] == 2
    assert d.stop() == 0, d.output()  # env1 is still linked, with its change to flush
    assert "internal error" not in d.output()

    d.start()  # the merged content survived, and the daemon starts with it
    with d.client() as c:
        for env_id, key in zip(ids, ("fragment", "deep"), strict=True):
            doc = Doc()
            doc.apply_update(c.export(env_id, "yjs"))
            assert key in doc.get("environment", type=Map)
        assert [link["id"] for link in c.call("env.links")] == [ids[1]]
    assert d.stop() == 0, d.output()
