"""LAN sync end to end on loopback: whole daemons (`serve()`, store, socket, spaces, peer manager)
with static peers, driven only through their local sockets, plus real daemon processes.

Two and three daemons share, converge and edit on every side; edits made while a daemon was
stopped merge when it is back; `env share --copy`, `env unshare` and `env delete` act on every
member; `peers [--json]` and the `peer-connected` / `peer-disconnected` events report states and
reasons. Everything listens on 127.0.0.1 only and mDNS is off (conftest: PEERDAEMON_NO_MDNS=1).

Their helpers (`Dev`, `converged`...) are in daemonutil.py and daemonproc.py, shared with
test_lan_adversarial.py and test_lan_netns.py.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from daemonproc import daemons_fixture, export, lan_pair, pd, shared_space  # noqa: F401  (fixture)
from daemonutil import (
    ENV_FILE,
    Dev,
    absent,
    base_fixture,  # noqa: F401  (fixture)
    converged,
    devs_fixture,  # noqa: F401  (fixture)
    make_space,
    wait_state,
)
from helpers import LOCAL, TIMEOUT, free_port, run_cli, until, until_sync

from peerdaemon.daemon.supervisor import DaemonConfig, mdns_allowed


# --- two and three daemons -----------------------------------------------------------------------
async def test_two_daemons_share_converge_and_edit_on_each_side(devs, nursery):
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery, a)  # b dials a (static peer); a only listens
    space_id = await make_space(a, b)
    row_b = await wait_state(b, a, "connected")
    row_a = await wait_state(a, b, "connected")
    assert row_b["name"] == "a" and row_b["direction"] == "outgoing"
    assert row_b["address"] == a.address and row_b["spaces"] == 1
    assert row_a["name"] == "b" and row_a["direction"] == "incoming"
    # an incoming row shows where the live connection comes from: loopback, b's dial port
    assert row_a["address"].startswith(f"{LOCAL}:") and row_a["address"] != b.address

    env_id = await a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    first = await converged([a, b], env_id)
    assert first == await a.export(env_id) and first["name"] == "Test env"

    async with await b.client.subscribe_env(env_id) as sub:
        await a.set_endpoint(env_id, 0, "edited-on-a")
        with trio.fail_after(TIMEOUT):
            event = await sub.__anext__()
        assert event["type"] == "change" and event["origin"] == f"peer:{a.device}"
        assert "/routes/0/endpoint" in event["paths"]
    await b.set_endpoint(env_id, 1, "edited-on-b")
    await b.patch(
        env_id, {"op": "replace", "path": "/routes/2/responses/0/body", "value": "from b"}
    )
    after = await converged([a, b], env_id)
    assert [r["endpoint"] for r in after["routes"][:3]] == ["edited-on-a", "edited-on-b", "file"]
    assert after["routes"][2]["responses"][0]["body"] == "from b"

    # the space document converged too: both list both members and the environment
    for dev in (a, b):
        [space] = await dev.op("space.list")
        assert sorted(m["name"] for m in space["members"]) == ["a", "b"]
        assert [e["id"] for e in space["environments"]] == [env_id]
    assert (await a.row(b))["synced"] and (await b.row(a))["synced"]
    assert (await b.row(a))["bytes_sent"] > 0 and (await b.row(a))["bytes_received"] > 0
    # b dialed before the two shared a space: unauthorized (maybe), then connected, once
    kinds = await a.peer_events()
    assert kinds[-1] == ("peer-connected", b.device, None)
    assert set(kinds[:-1]) <= {("peer-disconnected", b.device, "unauthorized")}


async def test_three_daemons_converge_through_the_middle_one(devs, nursery):
    """a <- b <- c: c only knows b (b invited it), so everything crosses b."""
    a, b, c = devs("a"), devs("b"), devs("c")
    await a.start(nursery)
    await b.start(nursery, a)
    await c.start(nursery, b)
    space_id = await make_space(a, b)
    code = (await b.op("space.invite", space=space_id))["code"]
    await c.op("space.join", code=code)
    await wait_state(c, b, "connected")
    await wait_state(a, b, "connected")
    assert await a.row(c) is None and await c.row(a) is None  # never connected directly

    env_id = await a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    await converged([a, b, c], env_id)
    for i, dev in enumerate((a, b, c)):
        await dev.set_endpoint(env_id, i, f"edit-{dev.name}")
        final = await converged([a, b, c], env_id)
    assert [r["endpoint"] for r in final["routes"][:3]] == ["edit-a", "edit-b", "edit-c"]
    # a new share on the far end reaches the other end
    env2 = await c.import_env(new_id=True, name="from c")
    await c.op("env.share", id=env2, space=space_id)
    assert (await converged([a, b, c], env2))["name"] == "from c"
    await until(
        lambda: _members_are(a, space_id, ["a", "b", "c"]), what="a sees c as a member via b"
    )


async def _members_are(dev: Dev, space_id: str, names: list[str]) -> bool:
    spaces = {s["id"]: s for s in await dev.op("space.list")}
    return sorted(m["name"] for m in spaces[space_id]["members"]) == names


async def test_edits_made_while_a_daemon_was_stopped_merge_when_it_is_back(devs, nursery):
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery, a)
    space_id = await make_space(a, b)
    env_id = await a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    await converged([a, b], env_id)
    body = "/routes/0/responses/0/body"
    await a.patch(env_id, {"op": "replace", "path": body, "value": "hello world"})
    await converged([a, b], env_id)

    await b.stop()
    await wait_state(a, b, "disconnected", "closed")
    # a edits while b is stopped ...
    await a.set_endpoint(env_id, 1, "a-while-b-was-down")
    await a.set_endpoint(env_id, 3, "a-same-field")
    await a.patch(env_id, {"op": "replace", "path": body, "value": "hello, big world"})
    env_a = await a.import_env(new_id=True, name="new on a")
    await a.op("env.share", id=env_a, space=space_id)
    kinds = [k for k in await a.peer_events() if k[2] != "unauthorized"]  # (before b joined)
    assert kinds == [("peer-connected", b.device, None), ("peer-disconnected", b.device, "closed")]
    await a.stop()

    # ... then b edits while a is stopped: neither saw the other's edits
    await b.start(nursery, a)
    await wait_state(b, a, "disconnected", "unreachable")
    await b.set_endpoint(env_id, 2, "b-while-a-was-down")
    await b.set_endpoint(env_id, 3, "b-same-field")
    await b.patch(env_id, {"op": "replace", "path": body, "value": "hello world!!"})
    await b.patch(env_id, {"op": "remove", "path": "/routes/10"})

    await a.start(nursery, b)  # same port and data; both dial now
    await wait_state(a, b, "connected")
    merged = await converged([a, b], env_id)
    endpoints = [r["endpoint"] for r in merged["routes"]]
    assert endpoints[1:3] == ["a-while-b-was-down", "b-while-a-was-down"]
    assert endpoints[3] in ("a-same-field", "b-same-field")  # one property: one writer wins
    assert "data-bucket" not in endpoints and len(endpoints) == 10
    # a body merges per character: both insertions survive
    assert merged["routes"][0]["responses"][0]["body"] == "hello, big world!!"
    assert (await converged([a, b], env_a))["name"] == "new on a"
    assert (await a.peer_events())[-1] == ("peer-connected", b.device, None)  # a new event log
    assert (await b.peer_events())[-2:] == [
        ("peer-disconnected", a.device, "unreachable"),
        ("peer-connected", a.device, None),
    ]


# --- sharing semantics ---------------------------------------------------------------------------
async def test_copy_unshare_and_delete_act_on_every_member(devs, nursery):
    a, b, c = devs("a"), devs("b"), devs("c")
    await a.start(nursery)
    await b.start(nursery, a)
    await c.start(nursery, a)
    space_id = await make_space(a, b, c)
    await wait_state(a, b, "connected")
    await wait_state(a, c, "connected")

    # share --copy: the duplicate is shared, the original stays local
    original = await a.import_env()
    copied = (await a.op("env.share", id=original, space=space_id, copy=True))["id"]
    assert copied != original
    await converged([a, b, c], copied)
    assert await a.export(original) is not None
    assert await b.export(original) is None and await c.export(original) is None
    await a.set_endpoint(original, 0, "local-only")
    await a.set_endpoint(copied, 0, "shared")
    assert (await converged([a, b, c], copied))["routes"][0]["endpoint"] == "shared"
    assert await b.export(original) is None  # the original never leaves a

    # a barrier for "does not sync": an edit of a still-shared env that arrives after
    barrier = await a.import_env(new_id=True, name="barrier")
    await a.op("env.share", id=barrier, space=space_id)
    await converged([a, b, c], barrier)

    # unshare: every member keeps its own local copy, and it stops syncing
    await b.op("env.unshare", id=copied)
    for dev in (a, b, c):
        await until(
            lambda dev=dev: _space_envs_are(dev, space_id, {barrier}), what=f"{dev.name}: unshared"
        )
    await a.set_endpoint(copied, 1, "a-after-unshare")
    await c.set_endpoint(copied, 1, "c-after-unshare")
    await a.set_endpoint(barrier, 0, "barrier-1")
    await c.set_endpoint(barrier, 1, "barrier-2")
    await converged([a, b, c], barrier)
    copies = {dev.name: await dev.export(copied) for dev in (a, b, c)}
    assert [copies[n]["routes"][1]["endpoint"] for n in "abc"] == [
        "a-after-unshare",
        "test2",
        "c-after-unshare",
    ]
    assert all(copies[n]["routes"][0]["endpoint"] == "shared" for n in "abc")
    unshared = [e for e in await c.events() if e["type"] == "environment-unshared"]
    assert [(e["data"]["id"], e["data"]["origin"]) for e in unshared] == [
        (copied, f"peer:{a.device}")  # b's unshare reached c through a: origin is the link
    ]

    # delete of a shared environment: gone from every member's device
    await c.op("env.delete", id=barrier)
    for dev in (a, b, c):
        await until(lambda dev=dev: absent(dev, barrier), what=f"{dev.name}: {barrier} deleted")
    assert await a.env_ids() == {original, copied}
    assert await b.env_ids() == {copied} and await c.env_ids() == {copied}
    deleted = [e for e in await a.events() if e["type"] == "environment-deleted"]
    assert [e["data"]["origin"] for e in deleted if e["data"]["id"] == barrier] == [
        f"peer:{c.device}"
    ]


async def _space_envs_are(dev: Dev, space_id: str, ids: set[str]) -> bool:
    spaces = {s["id"]: s for s in await dev.op("space.list")}
    return {e["id"] for e in spaces[space_id]["environments"]} == ids


# --- peers: states, reasons, events, the command -------------------------------------------------
async def test_peers_command_and_events_report_states_and_reasons(devs, nursery, capsys):
    a, b, stranger = devs("a"), devs("b"), devs("stranger")
    nobody = free_port()
    await a.start(nursery, (LOCAL, nobody))
    sock = ["--socket", str(a.socket_path)]
    async with await a.client.subscribe_events(since=0) as live:  # held events, then pushes
        await b.start(nursery, a)
        await stranger.start(nursery, a)
        space_id = await make_space(a, b)
        await make_space(stranger, name="Elsewhere")
        await wait_state(a, b, "connected")
        await wait_state(a, stranger, "disconnected", "unauthorized")
        await until(
            lambda: _row_by_address(a, f"{LOCAL}:{nobody}", "unreachable"), what="unreachable row"
        )

        # a re-dials `nobody` and the stranger re-dials a every 0.5 s, each attempt a brief
        # `connecting`: read the command's output at a moment between attempts
        async def peers_json() -> Any:
            assert await run_cli(*sock, "peers", "--json") == 0
            out = json.loads(capsys.readouterr().out)
            rows = {r["name"] or r["address"]: r for r in out["peers"]}
            retried = (rows[f"{LOCAL}:{nobody}"], rows["stranger"])
            return out if all(r["state"] == "disconnected" for r in retried) else None

        result = await until(peers_json, what="a reading between two dials")
        assert result["device"] == a.device and result["name"] == "a"
        rows = {r["name"] or r["address"]: r for r in result["peers"]}
        assert rows["b"]["state"] == "connected" and rows["b"]["reason"] is None
        assert rows["b"]["direction"] == "incoming" and rows["b"]["device"] == b.device
        assert rows["stranger"]["state"] == "disconnected"
        assert rows["stranger"]["reason"] == "unauthorized"
        assert "direction" not in rows["stranger"]
        nowhere = rows[f"{LOCAL}:{nobody}"]
        assert nowhere["device"] is None and nowhere["reason"] == "unreachable"

        async def peers_table() -> Any:
            assert await run_cli(*sock, "peers") == 0
            lines = capsys.readouterr().out.splitlines()
            assert lines[0].split() == ["NAME", "DEVICE", "ADDRESS", "STATE", "REASON"]
            table = {line.split()[0]: line.split() for line in lines[1:]}
            retried = (table["-"][3], table["stranger"][3])
            return table if retried == ("disconnected", "disconnected") else None

        table = await until(peers_table, what="a table between two dials")
        assert table["b"][1:] == [b.device, rows["b"]["address"], "connected", "-"]
        assert table["stranger"][3:] == ["disconnected", "unauthorized"]
        assert table["-"][1:] == ["-", f"{LOCAL}:{nobody}", "disconnected", "unreachable"]

        await b.stop()
        await wait_state(a, b, "disconnected", "closed")
        assert await run_cli(*sock, "peers", "--json") == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["peers"] if r["name"]}
        assert (rows["b"]["state"], rows["b"]["reason"]) == ("disconnected", "closed")

        # the live subscription saw the same states, as events
        seen: list[tuple[str, str | None, str | None]] = []
        want = {
            ("peer-connected", b.device, None),
            ("peer-disconnected", stranger.device, "unauthorized"),
            ("peer-disconnected", None, "unreachable"),
            ("peer-disconnected", b.device, "closed"),
        }

        def note(event: dict) -> None:
            if event["type"].startswith("peer-"):
                data = event["data"]
                seen.append((event["type"], data["device"], data["reason"]))
                connected = event["type"] == "peer-connected"
                assert data["state"] == ("connected" if connected else "disconnected")

        for event in live.initial["events"]:
            note(event)
        with trio.move_on_after(TIMEOUT):
            async for event in live:
                note(event)
                if want <= set(seen):
                    break
        assert want <= set(seen), seen
        assert seen.index(("peer-connected", b.device, None)) < seen.index(
            ("peer-disconnected", b.device, "closed")
        )
        assert seen.count(("peer-disconnected", None, "unreachable")) == 1  # retries: one event
    assert space_id


async def _row_by_address(dev: Dev, address: str, reason: str) -> bool:
    return any(r["address"] == address and r["reason"] == reason for r in await dev.rows())


async def test_an_incoming_row_shows_the_live_address_not_a_dead_dialed_one(devs, nursery):
    """A device known at an address where nothing answers (say mDNS published an interface
    address while the listener is bound to loopback) and connected over another: the row shows
    the live connection's address (regression: it kept the dead dialed one)."""
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery)
    dead = ("127.0.0.2", b.port)  # b listens on 127.0.0.1 only: refused
    a.daemon.peers.add_address(*dead, b.device, "mdns")
    await wait_state(a, b, "disconnected", "unreachable")
    assert (await a.row(b))["address"] == f"127.0.0.2:{b.port}"
    await make_space(a, b)  # b joins; the invite has a's address, so b dials a
    row = await wait_state(a, b, "connected")
    assert row["direction"] == "incoming"
    assert row["address"].startswith(f"{LOCAL}:") and row["address"] != f"127.0.0.2:{b.port}"


def test_no_mdns_for_a_loopback_listener(monkeypatch, tmp_path):
    """Only a decision is computed here: no daemon runs, nothing is sent."""
    monkeypatch.delenv("PEERDAEMON_NO_MDNS", raising=False)

    def config(host: str) -> DaemonConfig:
        return DaemonConfig(tmp_path, tmp_path / "s", listen=(host, 0))

    assert not mdns_allowed(config("127.0.0.1"))
    assert not mdns_allowed(config("::1"))
    assert not mdns_allowed(config("localhost"))
    assert mdns_allowed(config("0.0.0.0"))
    assert mdns_allowed(config("192.0.2.1"))
    monkeypatch.setenv("PEERDAEMON_NO_MDNS", "1")
    assert not mdns_allowed(config("0.0.0.0"))


# --- real daemon processes -----------------------------------------------------------------------
def peer_row(daemon, device: str) -> dict | None:
    with daemon.client() as c:
        return next((r for r in c.call("peers")["peers"] if r["device"] == device), None)


def test_real_processes_share_survive_kill9_and_converge(daemons, fixture_dir):
    a, b = lan_pair(daemons)
    a.start()
    b.start()
    dev_a = json.loads(pd(a.socket_path, "status", "--json"))["device"]
    dev_b = json.loads(pd(b.socket_path, "status", "--json"))["device"]
    space, [env_id] = shared_space(a, b, "Procs", fixture_dir / ENV_FILE)

    rows = json.loads(pd(b.socket_path, "peers", "--json"))["peers"]
    assert [(r["device"], r["state"], r["direction"]) for r in rows] == [
        (dev_a, "connected", "outgoing")
    ]
    patch = json.dumps([{"op": "replace", "path": "/routes/0/endpoint", "value": "from-b"}])
    pd(b.socket_path, "env", "patch", env_id, "-", input=patch)
    until_sync(
        lambda: (export(a, env_id) or {})["routes"][0]["endpoint"] == "from-b",
        what="b -> a",
        while_down=True,
    )

    b.kill9()
    until_sync(
        lambda: (peer_row(a, dev_b) or {}).get("state") == "disconnected",
        what="a sees b go",
        while_down=True,
    )
    assert peer_row(a, dev_b)["reason"] == "closed"
    patch = json.dumps([{"op": "replace", "path": "/routes/1/endpoint", "value": "a-alone"}])
    pd(a.socket_path, "env", "patch", env_id, "-", input=patch)
    b.start()
    merged = until_sync(
        lambda: (e := export(b, env_id)) and e == export(a, env_id) and e,
        what="b catches up",
        while_down=True,
    )
    assert [r["endpoint"] for r in merged["routes"][:2]] == ["from-b", "a-alone"]
    assert a.stop() == 0 and b.stop() == 0
