"""Presence through the hub (docs/presence.md): two daemons with no LAN link between them see
each other's presence through a real hub in this process, a daemon's states leave when its hub
link closes, and an npm y-websocket client (tests/interop/presence.test.mjs, the real y-protocols
awareness) and a daemon see each other: the web editor appears in the daemon's
`presence.list`, the daemon in the web client's awareness, and the editor is gone from the
daemon's presence once it leaves."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from daemonutil import (
    Dev,
    base_fixture,  # noqa: F401  (fixture)
    converged,
    devs_fixture,  # noqa: F401  (fixture)
)
from helpers import running_hub, until

from peerdaemon.hub.accounts import Accounts

INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")


def _space(listing: dict, space: str) -> dict:
    return next(s for s in listing["spaces"] if s["space"] == space)


def _editors(listing: dict, space: str, env: str) -> list[dict]:
    view = _space(listing, space)
    return next((e["editors"] for e in view["environments"] if e["id"] == env), [])


async def _attach(dev: Dev, hub, space: str, token: str) -> None:
    key = hub.peer_endpoint.identity.device_id  # ws:// does not authenticate the hub
    url = f"ws://127.0.0.1:{hub.port}"
    await dev.op("space.hub", space=space, url=url, token=token, hub_key=key)


async def test_two_daemons_see_each_other_through_the_hub_only(base, devs, nursery):
    with Accounts.open(base / "hub") as accounts:
        token = accounts.add_user("alice")
    async with running_hub(base / "hub") as hub:
        a, b = devs("a"), devs("b")
        await a.start(nursery)
        await b.start(nursery)  # no static peer: no LAN link, the hub is the only path
        space = (await a.op("space.create", name="Team"))["id"]
        env = await a.import_env()
        await a.op("env.share", id=env, space=space)
        await _attach(a, hub, space, token)
        code = (await a.op("space.invite", space=space, addresses=[]))["code"]
        await b.op("space.join", code=code)
        await _attach(b, hub, space, token)
        await converged([a, b], env)
        assert await b.rows() == [] or all(r.get("kind") == "hub" for r in await b.rows())

        await a.op("presence.set", env=env, entity="route-uuid", field="body")

        async def a_on_b() -> dict | None:
            for editor in _editors(await b.op("presence.list"), space, env):
                if editor["device"] == a.device and any(
                    e.get("entity") == "route-uuid" for e in editor["editing"]
                ):
                    return editor
            return None

        editor = await until(a_on_b, what="a's selection on b through the hub")
        assert editor["via"] == ["hub"]
        view = _space(await b.op("presence.list"), space)
        assert {c["device"] for c in view["connected"]} == {a.device, b.device}

        await a.stop()  # its hub link closes: the hub removes its states at once

        async def a_gone() -> bool:
            view = _space(await b.op("presence.list"), space)
            return a.device not in {c["device"] for c in view["connected"]}

        with trio.fail_after(8):  # well before the 30 s time-out
            await until(a_gone, what="a gone from b's presence")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_a_yjs_client_and_a_daemon_see_each_other(base, devs, nursery):
    if not (INTEROP / "node_modules" / "y-websocket").exists():
        pytest.fail(f"y-websocket is not installed: run `npm ci --prefix {INTEROP}`")
    with Accounts.open(base / "hub") as accounts:
        token = accounts.add_user("alice")
    async with running_hub(base / "hub") as hub:
        a = devs("a")
        await a.start(nursery)
        space = (await a.op("space.create", name="Team"))["id"]
        env = await a.import_env()
        await a.op("env.share", id=env, space=space)
        await _attach(a, hub, space, token)
        with trio.fail_after(15):
            while not hub.docs.has(space, env):
                await trio.sleep(0.02)
        await a.op("presence.set", env=env, entity="route-uuid")

        argv = [
            NODE or "node",
            str(INTEROP / "presence.test.mjs"),
            "--url",
            f"ws://127.0.0.1:{hub.port}/yjs/{space}",
            "--room",
            env,
            "--token",
            token,
            "--name",
            "Web Ada",
            "--color",
            "#123456",
            "--expect-device",
            a.device,
        ]
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            lines = _lines(proc.stdout)
            with trio.fail_after(30):
                first = json.loads(await lines.__anext__())
            assert "seen" in first, first
            seen = first["seen"]  # the daemon's state, as the web client got it
            assert seen["device"]["name"] == "a" and seen["user"]["color"].startswith("#")
            assert {"via": "editor", "entity": "route-uuid"} in seen["editing"]

            async def web_on_a() -> dict | None:
                for editor in _editors(await a.op("presence.list"), space, env):
                    if editor["client"] == first["client"]:
                        return editor
                return None

            web = await until(web_on_a, what="the web client in a's presence")
            assert web["user"] == "Web Ada" and web["color"] == "#123456"
            assert web["device"] is None and web["via"] == ["hub"]

            await proc.stdin.aclose()  # the web client leaves
            with trio.fail_after(20):
                last = json.loads(await lines.__anext__())
            assert last == {"ok": True}
            with trio.fail_after(8):
                while await web_on_a() is not None:
                    await trio.sleep(0.05)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _lines(stream):
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buffer:
                yield buffer.decode()
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
