"""A document failing locally (docs/peer-protocol.md section 5) over a real LAN link on
loopback: content no environment can hold (a Y.XmlFragment in the `environment` map), merged on
one daemon, reaches the other one, whose peer link, mirror and later edits go on; unlink and
stopping both daemons end cleanly."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from daemonutil import InProcessDaemon
from helpers import until
from modelutil import FIXTURE_DIR
from pycrdt import Doc, Map, XmlFragment

from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.peer import PeerConfig

LOCAL = "127.0.0.1"
FAST = PeerConfig(backoff_initial=0.05, backoff_max=0.5, connect_timeout=2.0, close_grace=0.5)
TIMEOUT = 10.0


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pd"))  # short: AF_UNIX paths are limited to ~107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start(dev: InProcessDaemon, nursery: trio.Nursery, *peers: int) -> int:
    config = DaemonConfig(
        dev.data_dir,
        dev.socket_path,
        name=dev.name,
        listen=(LOCAL, 0),
        peers=[(LOCAL, port) for port in peers],
        peer_config=FAST,
    )
    daemon = await dev.start_with(nursery, config)
    return daemon.peer_port


async def top(dev: InProcessDaemon, env_id: str) -> Map:
    """The `environment` map as the daemon's Yjs state says (read without the JSON export)."""
    doc = Doc()
    doc.apply_update(await dev.client.export(env_id, "yjs"))
    return doc.get("environment", type=Map)


async def merge_top(dev: InProcessDaemon, env_id: str, key: str, value: Any) -> dict:
    doc = Doc()
    doc.apply_update(await dev.client.export(env_id, "yjs"))
    before = doc.get_state()
    doc.get("environment", type=Map)[key] = value
    return await dev.client.merge(env_id, doc.get_update(before))


async def test_bad_content_from_a_peer_keeps_the_link_and_the_mirror_going(base, nursery):
    a, b = InProcessDaemon(base, "a"), InProcessDaemon(base, "b")
    port = await start(a, nursery)
    await start(b, nursery, port)
    space_id = (await a.op("space.create", name="Team"))["id"]
    code = (await a.op("space.invite", space=space_id))["code"]
    await b.op("space.join", code=code)
    path = base / "env.json"
    shutil.copy(FIXTURE_DIR / "test-env.json", path)
    env_id = (await a.op("env.import", json=path.read_text()))["id"]
    await a.op("env.share", id=env_id, space=space_id)
    await until(lambda: b.client.list_envs(), what="the environment on b", timeout=TIMEOUT)
    await b.op("env.link", id=env_id, path=str(path))
    cursor = (await b.client.status())["events"]  # (b dialed before the space: unauthorized)

    assert await merge_top(a, env_id, "bad", XmlFragment(["x"])) == {
        "created": False,
        "changed": True,
    }

    async def b_has(key: str, value: Any = None) -> bool:
        m = await top(b, env_id)
        return key in m and (value is None or m[key] == value)

    await until(lambda: b_has("bad"), what="the bad content on b", timeout=TIMEOUT)
    await merge_top(a, env_id, "name", "after the bad content")  # the link still carries edits
    await until(
        lambda: b_has("name", "after the bad content"), what="a later edit on b", timeout=TIMEOUT
    )
    rows = (await b.op("peers"))["peers"]
    assert [r["state"] for r in rows] == ["connected"]
    disconnects = [
        e
        for e in (await b.client.subscribe_events(since=cursor)).initial["events"]
        if e["type"] == "peer-disconnected"
    ]
    assert disconnects == []
    assert (await b.op("env.unlink", id=env_id))["unlinked"] is True
    await b.stop()  # cancelled like SIGTERM: ends without an error
    await a.stop()
