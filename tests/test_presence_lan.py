"""Presence across LAN daemons (docs/presence.md): whole daemons in this process (`Dev`) joined
by a space, driven through their sockets: `presence.set` on one shows on the other's
`presence.list` and subscription, a closed socket connection clears only its own selection, a
save marks the environment, and a closed link leaves no ghost."""

from __future__ import annotations

import json
from typing import Any

import trio
from daemonutil import (
    Dev,
    base_fixture,  # noqa: F401  (fixture)
    converged,
    devs_fixture,  # noqa: F401  (fixture)
    make_space,
    wait_state,
)
from helpers import run_cli, until

from peerdaemon.api.client import DaemonError, open_client


async def _shared_pair(devs: Any, nursery: trio.Nursery) -> tuple[Dev, Dev, str, str]:
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery, a)
    space = await make_space(a, b)
    env = await a.import_env()
    await a.op("env.share", id=env, space=space)
    await converged([a, b], env)
    await wait_state(b, a, "connected")
    return a, b, space, env


def _space(listing: dict, space: str) -> dict:
    return next(s for s in listing["spaces"] if s["space"] == space)


def _editors(listing: dict, space: str, env: str) -> list[dict]:
    view = _space(listing, space)
    return next((e["editors"] for e in view["environments"] if e["id"] == env), [])


async def test_presence_set_on_one_daemon_shows_on_the_other(devs, nursery):
    a, b, space, env = await _shared_pair(devs, nursery)

    async def connected_on_b() -> bool:
        view = _space(await b.op("presence.list"), space)
        return {c["device"] for c in view["connected"]} == {a.device, b.device}

    await until(connected_on_b, what="both devices connected to the space on b")
    route = (await a.export(env))["routes"][0]["uuid"]
    answer = await a.op("presence.set", env=env, entity=route, field="endpoint")
    assert _selections(answer["editors"][0]) == [
        {"via": "editor", "entity": route, "field": "endpoint"}
    ]

    async def a_edits_on_b() -> list[dict] | None:
        editors = _editors(await b.op("presence.list", space=space), space, env)
        return editors or None

    editors = await until(a_edits_on_b, what="a's selection on b")
    assert len(editors) == 1
    (editor,) = editors
    assert editor["device"] == a.device and editor["device_name"] == "a"
    assert editor["via"] == ["lan"] and editor["self"] is False
    assert editor["color"].startswith("#") and len(editor["color"]) == 7
    assert _selections(editor) == [{"via": "editor", "entity": route, "field": "endpoint"}]

    await a.op("presence.clear", env=env)
    await until(lambda: _no_selection(b, space, env), what="a's selection cleared on b")


def _selections(editor: dict) -> list[dict]:
    """An editor's selections (not the marks of recent saves: the import was one)."""
    return [e for e in editor["editing"] if e["via"] == "editor"]


async def _no_selection(dev: Dev, space: str, env: str) -> bool:
    editors = _editors(await dev.op("presence.list"), space, env)
    return not any(_selections(e) for e in editors)


async def test_a_closed_connection_clears_only_its_own_selection(devs, nursery):
    a, b, space, env = await _shared_pair(devs, nursery)
    async with open_client(a.socket_path) as one, open_client(a.socket_path) as two:
        await one.call("presence.set", env=env, entity="route-1")
        await two.call("presence.set", env=env, entity="route-2")

        async def both() -> bool:
            editors = _editors(await b.op("presence.list"), space, env)
            entities = {e.get("entity") for ed in editors for e in _selections(ed)}
            return entities == {"route-1", "route-2"}

        await until(both, what="both selections on b")
        await one.aclose()

        async def only_two() -> bool:
            editors = _editors(await b.op("presence.list"), space, env)
            entities = {e.get("entity") for ed in editors for e in _selections(ed)}
            return entities == {"route-2"}

        await until(only_two, what="only the open connection's selection left on b")


async def test_subscription_delivers_changes_and_a_save_marks_the_environment(devs, nursery):
    a, b, space, env = await _shared_pair(devs, nursery)
    a.daemon.presence.editors.window = 1.0  # the import's mark ends soon
    await until(lambda: _no_editor(b, space, env), what="the import's mark expired on b")
    sub = await b.client.subscribe("presence.subscribe", space=space)
    try:
        assert not _editors(sub.initial, space, env)
        await a.set_endpoint(env, 0, "saved-here")  # a socket write: a save on a

        async def editor_of_a() -> dict:
            async for event in sub:
                assert event["type"] == "presence" and event["space"] == space
                for e in event["environments"]:
                    for editor in e["editors"]:
                        if editor["device"] == a.device:
                            return editor
            raise AssertionError("the subscription ended")

        with trio.fail_after(10):
            editor = await editor_of_a()
        assert editor["editing"] == [{"via": "socket"}]
        # ...and the mark ends with its window, on b too
        await until(lambda: _no_editor(b, space, env), what="the save's mark expired on b")
    finally:
        await sub.aclose()


async def _no_editor(dev: Dev, space: str, env: str) -> bool:
    return not _editors(await dev.op("presence.list"), space, env)


async def test_bad_presence_requests_are_refused(devs, nursery):
    a = devs("a")
    await a.start(nursery)
    env = await a.import_env()
    for args, code in [
        ({}, "bad-request"),
        ({"env": "no-such-env"}, "not-found"),
        ({"env": env, "entity": 3}, "bad-request"),
        ({"env": env, "field": "x" * 600}, "bad-request"),
    ]:
        try:
            await a.op("presence.set", **args)
        except DaemonError as exc:
            assert exc.code == code, (args, exc)
        else:
            raise AssertionError(f"presence.set {args} was accepted")


async def test_no_ghost_after_the_link_closes(devs, nursery):
    a, b, space, env = await _shared_pair(devs, nursery)
    await a.op("presence.set", env=env, entity="r")

    async def a_edits_on_b() -> bool:
        return bool(_editors(await b.op("presence.list"), space, env))

    await until(a_edits_on_b, what="a's selection on b")
    await a.stop()

    async def gone() -> bool:
        view = _space(await b.op("presence.list"), space)
        devices = {c["device"] for c in view["connected"]}
        return devices == {b.device} and not _editors(await b.op("presence.list"), space, env)

    with trio.fail_after(5):  # well before the 30 s time-out: the link's close removes them
        await until(gone, what="a gone from b's presence")


async def test_display_name_set_live_shows_on_the_other_daemon(devs, nursery):
    a, b, space, env = await _shared_pair(devs, nursery)
    answer = await a.op("config.set", key="display_name", value="Ada Lovelace")
    assert answer["applies"] == "now", answer

    async def ada_on_b() -> dict | None:
        view = _space(await b.op("presence.list"), space)
        return next((c for c in view["connected"] if c["user"] == "Ada Lovelace"), None)

    client = await until(ada_on_b, what="a's display name on b")
    assert client["device"] == a.device and client["device_name"] == "a"


async def test_cli_presence_and_env_list_show_who_edits_what(devs, nursery, capsys):
    a, b, space, env = await _shared_pair(devs, nursery)
    await a.op("presence.set", env=env, entity="route-7", field="body")

    async def selected_on_b() -> bool:
        return not await _no_selection(b, space, env)

    await until(selected_on_b, what="a's selection on b")
    capsys.readouterr()
    assert await run_cli("--socket", str(b.socket_path), "presence", "Team") == 0
    out = capsys.readouterr().out
    assert out.startswith("Team: 2 connected\n")
    assert "a (a)" not in out and "b [me]" in out
    line = next(ln for ln in out.splitlines() if "route-7/body" in ln)
    assert " a  " in line  # who: a's device name (the import's save mark may follow)
    assert await run_cli("--socket", str(b.socket_path), "presence", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert _space(listing, space)["name"] == "Team"
    assert await run_cli("--socket", str(b.socket_path), "presence", "Nope") == 1
    assert "no space 'Nope'" in capsys.readouterr().err

    assert await run_cli("--socket", str(b.socket_path), "env", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROUTES", "SHARED", "LINKED", "EDITORS", "FLAGS"]
    assert next(ln for ln in lines if ln.startswith(env)).split()[-2] == "a"
    assert await run_cli("--socket", str(b.socket_path), "env", "list", "--json") == 0
    (entry,) = [e for e in json.loads(capsys.readouterr().out) if e["id"] == env]
    assert [e["device"] for e in entry["editors"]] == [a.device]
