"""`space remove-device` (docs/spaces.md "Removing a device"): the removed device is refused on
the LAN and through the hub, the space's secret rotates and reaches the other members (also one
that was offline at the removal), and a stolen laptop (a copy of the removed device's data
directory, with its own device key or a new one) gets nothing changed after the removal.

Whole daemons in this process with static peers on 127.0.0.1 (daemonutil's `Dev`), plus the
sans-I/O rules (handshake refusal, key hand-over) on in-memory connections.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import trio
from daemonproc import daemons_fixture, export, pd, processes_converged  # noqa: F401
from daemonutil import (
    ENV_FILE,
    Dev,
    base_fixture,  # noqa: F401  (fixture)
    converged,
    devs_fixture,  # noqa: F401  (fixture)
    make_space,
    wait_state,
)
from helpers import LOCAL, client, free_port, run_cli, running_hub, until, until_sync, url
from peerutil import FakeHost, MemoryConnection, drain_events, exchange, make_identity
from pycrdt import Map
from trio_websocket import ConnectionClosed, open_websocket_url

from peerdaemon.api.client import DaemonError
from peerdaemon.hub.accounts import Accounts
from peerdaemon.hub.removals import Removals
from peerdaemon.hub.ywebsocket import MSG_AUTH, decode_message
from peerdaemon.peer import (
    PeerConnection,
    PeerProtocolError,
    SpaceKeyReceived,
    UpdateReceived,
    apply_update,
    messages,
)
from peerdaemon.spaces.document import SpaceDoc
from peerdaemon.spaces.invite import Invite, decode_invite, encode_invite
from peerdaemon.spaces.removal import (
    MAX_PREVIOUS,
    adopt_key,
    commit_key,
    current_key_invalid,
    key_check,
    refusal,
    valid_keys,
)
from peerdaemon.spaces.service import Space, SpaceKey
from peerdaemon.store import Store

REMOVED = "device-removed"


async def space_of(dev: Dev, space_id: str) -> dict:
    return next(s for s in await dev.op("space.list") if s["id"] == space_id)


async def key_epoch(dev: Dev, space_id: str) -> int:
    return (await space_of(dev, space_id))["key_epoch"]


async def knows_removed(dev: Dev, space_id: str, device: str) -> bool:
    return device in {r["device"] for r in (await space_of(dev, space_id))["removed"]}


async def endpoints(dev: Dev, env_id: str) -> list[str]:
    env = await dev.export(env_id)
    return [r["endpoint"] for r in env["routes"]] if env else []


async def row_of(dev: Dev, other: Dev) -> dict | None:
    """`dev`'s row for `other`: by device id, or by address while `other` never proved its id
    (a listener that refuses us closes before its own auth)."""
    rows = await dev.rows()
    return next((r for r in rows if r["device"] == other.device), None) or next(
        (r for r in rows if r["address"] == other.address), None
    )


async def refused(dev: Dev, other: Dev, reason: str, after: float = 0.0) -> dict:
    """Wait until `dev`'s last attempt to reach `other`, begun after `after`, was refused."""

    async def probe() -> dict | None:
        row = await row_of(dev, other)
        ok = row and row["state"] == "disconnected" and row["reason"] == reason
        return row if ok and row["since"] > after else None

    return await until(probe, what=f"{dev.name}: {other.name} refuses ({reason})")


async def refused_again(dev: Dev, other: Dev, after: float, reason: str) -> None:
    """Wait for a redial of `dev` to `other` that started after `after` and was refused."""

    async def probe() -> bool:
        row = await row_of(dev, other)
        return bool(
            row
            and row["state"] == "disconnected"
            and row["reason"] == reason
            and row["since"] > after
        )

    await until(probe, what=f"{dev.name}: another refused attempt ({reason})")


async def connected_events(dev: Dev) -> int:
    return sum(1 for kind, _, _ in await dev.peer_events() if kind == "peer-connected")


async def three(devs, nursery) -> tuple[Dev, Dev, Dev, str, str]:
    """a, b, c in one space, c dialing a and b, b dialing a; one shared environment."""
    a, b, c = devs("a"), devs("b"), devs("c")
    await a.start(nursery)
    await b.start(nursery, a)
    await c.start(nursery, a, b)
    space_id = await make_space(a, b, c)
    env_id = await a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    await converged([a, b, c], env_id)
    await wait_state(c, b, "connected")
    await wait_state(c, a, "connected")
    return a, b, c, space_id, env_id


async def test_removed_device_is_refused_and_cut_off_on_the_lan(devs, nursery):
    a, b, c, space_id, env_id = await three(devs, nursery)
    result = await a.op("space.remove_device", space=space_id, device="c")  # by name
    assert result == {"space": space_id, "device": c.device, "epoch": 1}
    # b gets the new key (and the record), c is refused by both
    await until(lambda: key_epoch(b, space_id), what="b: key epoch 1")
    assert await key_epoch(b, space_id) == 1 and await knows_removed(b, space_id, c.device)
    await refused(c, a, REMOVED)
    await refused(c, b, REMOVED)
    removal = [e for e in await a.events() if e["type"] == "device-removed"]
    assert [e["data"] for e in removal] == [{"space": space_id, "device": c.device, "by": a.device}]
    b_keys = [e for e in await b.events() if e["type"] == "space-key-changed"]
    assert [e["data"] for e in b_keys] == [{"space": space_id, "epoch": 1, "by": a.device}]
    (entry,) = (await space_of(a, space_id))["removed"]
    assert entry["device"] == c.device and entry["by"] == a.device and entry["epoch"] == 1
    assert c.device not in {m["device"] for m in (await space_of(a, space_id))["members"]}

    connected = await connected_events(c)
    await c.set_endpoint(env_id, 0, "c-after-removal")
    await a.set_endpoint(env_id, 1, "a-after-removal")
    await b.set_endpoint(env_id, 2, "b-after-removal")
    after = time.time()
    both = await converged([a, b], env_id)
    assert [r["endpoint"] for r in both["routes"]][1:3] == ["a-after-removal", "b-after-removal"]
    # c keeps trying, and every attempt made after its edit is refused by both
    await refused_again(c, a, after, REMOVED)
    await refused_again(c, b, after, REMOVED)
    assert "c-after-removal" not in await endpoints(a, env_id)
    assert "c-after-removal" not in await endpoints(b, env_id)
    mine = await endpoints(c, env_id)
    assert "a-after-removal" not in mine and "b-after-removal" not in mine
    assert await connected_events(c) == connected


async def test_member_offline_at_the_removal_gets_the_key_when_back(devs, nursery):
    a, b, c, space_id, env_id = await three(devs, nursery)
    await b.stop()
    await c.stop()
    await a.op("space.remove_device", space=space_id, device=c.device[:9])  # an id prefix
    await b.start(nursery, a)
    await until(lambda: key_epoch(b, space_id), what="b: key from a")
    assert await knows_removed(b, space_id, c.device)
    await c.start(nursery, a, b)
    await refused(c, a, REMOVED)
    await refused(c, b, REMOVED)
    await b.set_endpoint(env_id, 0, "b-after-removal")
    await converged([a, b], env_id)
    assert "b-after-removal" not in await endpoints(c, env_id)
    assert await connected_events(c) == 0  # this run of c never got in


@pytest.mark.parametrize("new_key", [False, True], ids=["same-device-key", "new-device-key"])
async def test_stolen_laptop_gets_nothing(devs, nursery, base, new_key):
    a, b, c, space_id, env_id = await three(devs, nursery)
    await a.op("space.remove_device", space=space_id, device=c.device)
    await refused(c, a, REMOVED)
    await c.stop()
    thief = devs("thief")
    shutil.copytree(c.data_dir, thief.data_dir)
    if new_key:  # the thief moves the old secret to a device key of its own
        store = Store.open(thief.data_dir)
        try:
            store.put_setting("identity", {"private_key": os.urandom(32), "name": "thief"})
        finally:
            store.close()
    await a.set_endpoint(env_id, 0, "a-after-removal")
    await converged([a, b], env_id)
    await thief.start(nursery, a, b)
    assert (thief.device == c.device) is not new_key
    reason = "unauthorized" if new_key else REMOVED  # no member proving an old key / removed
    await refused(thief, a, reason)
    await refused(thief, b, reason)
    after = time.time()
    await refused_again(thief, a, after, reason)
    assert "a-after-removal" not in await endpoints(thief, env_id)
    assert await connected_events(thief) == 0


async def test_remove_device_refusals(devs, nursery, capsys):
    a, b = devs("a"), devs("b")
    await a.start(nursery)
    await b.start(nursery, a)
    space_id = await make_space(a, b)

    async def b_is_member() -> bool:
        return b.device in {m["device"] for m in (await space_of(a, space_id))["members"]}

    await until(b_is_member, what="b in a's member list")
    for device, code in [
        ("a", "bad-request"),  # oneself: that is `space leave`
        ("nobody", "not-found"),
        ("", "bad-request"),
        ("b", None),  # b's name: removed
        ("b", "not-found"),  # no member of that name any more
        (b.device, "exists"),
    ]:
        if code is None:  # through the CLI
            sock = ["--socket", str(a.socket_path)]
            assert await run_cli(*sock, "space", "remove-device", "Team", device) == 0
            out = capsys.readouterr().out
            assert out.startswith(f"removed {b.device} from space {space_id}") and "token" in out
            assert await run_cli(*sock, "space", "list") == 0
            assert f"{space_id}: removed device {b.device}" in capsys.readouterr().out
            continue
        with pytest.raises(DaemonError) as err:
            await a.op("space.remove_device", space=space_id, device=device)
        assert err.value.code == code, device


# -- through the hub -------------------------------------------------------------------------------
async def attach(dev: Dev, hub, space: str, token: str) -> None:
    key = hub.peer_endpoint.identity.device_id  # ws:// does not authenticate the hub
    await dev.op(
        "space.hub", space=space, url=f"ws://127.0.0.1:{hub.port}", token=token, hub_key=key
    )


async def expect_denied(server, space: str, doc: str, token: str, reason: str, code: int) -> None:
    """The auth message's permission-denied, then a close: no data at all."""
    async with open_websocket_url(url(server, space, doc, token)) as ws:
        first = decode_message(bytes(await ws.get_message()))
        assert (first.kind, first.sub, first.payload) == (MSG_AUTH, 0, reason.encode())
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason.code == code


async def hub_row(dev: Dev) -> dict | None:
    return next((r for r in await dev.rows() if r.get("kind") == "hub"), None)


async def hub_refuses(dev: Dev, after: float = 0.0) -> None:
    async def probe() -> bool:
        row = await hub_row(dev)
        return bool(row and row["reason"] == REMOVED and row["since"] > after)

    await until(probe, what=f"{dev.name}: the hub refuses it ({REMOVED})")


async def test_the_hub_refuses_the_removed_device_and_its_token(devs, nursery, base):
    with Accounts.open(base / "hub") as accounts:
        tokens = {user: accounts.add_user(user) for user in ("alice", "bob", "carol")}
    async with running_hub(base / "hub") as hub:
        a, b, c = devs("a"), devs("b"), devs("c")
        for dev in (a, b, c):
            await dev.start(nursery)  # no static peers: the hub is the only path
        space = (await a.op("space.create", name="Team"))["id"]
        env = await a.import_env()
        await a.op("env.share", id=env, space=space)
        await attach(a, hub, space, tokens["alice"])
        await until(lambda: hub.docs.has(space, env), what="the space on the hub")
        with Accounts.open(base / "hub") as accounts:
            accounts.add_member(space, "bob")
            accounts.add_member(space, "carol")
        for dev, user in ((b, "bob"), (c, "carol")):
            code = (await a.op("space.invite", space=space, addresses=[]))["code"]
            await dev.op("space.join", code=code)
            await attach(dev, hub, space, tokens[user])
        await converged([a, b, c], env)
        async with client(hub, space, env, tokens["carol"]):
            pass  # carol's token reaches the space over /yjs before the removal
        async with client(hub, space, env, tokens["carol"], sync=False) as web:
            await a.op("space.remove_device", space=space, device=c.device)
            await hub_refuses(c)  # its live link closed, then every redial refused
            with pytest.raises(ConnectionClosed):  # the live y-websocket client is cut too
                with trio.fail_after(10):
                    while True:
                        await web.recv()
        await expect_denied(hub, space, env, tokens["carol"], "forbidden", 4403)
        async with client(hub, space, env, tokens["bob"]):
            pass  # another user's token is not affected

        await until(lambda: knows_removed(b, space, c.device), what="b: the removal")
        await c.set_endpoint(env, 0, "c-after-removal")
        await a.set_endpoint(env, 1, "a-after-removal")
        after = time.time()
        await converged([a, b], env)
        await hub_refuses(c, after)
        assert "c-after-removal" not in await endpoints(a, env)
        assert "c-after-removal" not in await endpoints(b, env)
        assert "a-after-removal" not in await endpoints(c, env)

        # the stolen laptop under a device key of its own: carol's token is refused all the same
        await c.stop()
        thief = devs("thief")
        shutil.copytree(c.data_dir, thief.data_dir)
        store = Store.open(thief.data_dir)
        try:
            store.put_setting("identity", {"private_key": os.urandom(32), "name": "thief"})
        finally:
            store.close()
        await thief.start(nursery)
        assert thief.device != c.device
        await hub_refuses(thief)
        assert "a-after-removal" not in await endpoints(thief, env)
        assert await connected_events(thief) == 0
        assert not [d for d in hub.peer_endpoint.daemons() if d["device"] == thief.device]


# -- the sans-I/O rules: handshake refusals and the key hand-over ---------------------------------
class MemberHost(FakeHost):
    """A FakeHost with the removal rules of `SpacesService.refuse_peer` / `receive_space_key`:
    one space whose current key is the first of `keys`, its members and removed devices."""

    def __init__(
        self, keys: list[SpaceKey], members: set[str], removed: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(keys)
        self.members, self.removed = members, set(removed)
        self.received: list[tuple[str, int, bytes, str]] = []

    def refuse_peer(self, device: str, space: str, epoch: int) -> str | None:
        if device in self.removed and space == "s":  # removed from space s only
            return REMOVED
        current = next(k.epoch for k in self.spaces if k.id == space)
        return "unauthorized" if epoch < current and device not in self.members else None

    def receive_space_key(self, space: str, epoch: int, secret: bytes, sender: str) -> bool:
        self.received.append((space, epoch, secret, sender))
        return True


class Logged(MemoryConnection):
    """Records, in order, the documents applied and the keys received."""

    def __init__(self, *args, **kwargs) -> None:
        self.log: list[tuple[str, str]] = []
        super().__init__(*args, **kwargs)

    def _apply(self) -> None:
        while (event := PeerConnection.next_event(self)) is not None:
            if isinstance(event, UpdateReceived):
                self.log.append(("doc", event.doc))
                apply_update(self, event, self.host)
            else:
                if isinstance(event, SpaceKeyReceived):
                    self.log.append(("key", event.space))
                self._kept.append(event)


def pair(host_a: FakeHost, host_b: FakeHost, id_a, id_b, *, b_takes_keys: bool = True):
    a = Logged(id_a, host_a, dialer=True, now=0.0)
    b = Logged(id_b, host_b, dialer=False, now=0.0)
    if not b_takes_keys:  # a peer that predates key epochs: its auth has no `keys`
        original = b.handshake._auth
        b.handshake._auth = lambda: {k: v for k, v in original().items() if k != "keys"}
    exchange(a, b)
    return a, b


OLD, NEW = os.urandom(32), os.urandom(32)


def test_a_member_proving_an_older_key_gets_the_new_one_after_the_space_document():
    id_a, id_b = make_identity("a"), make_identity("b")
    host_a = MemberHost(
        [SpaceKey("s", NEW, 1), SpaceKey("s", OLD, 0)], members={id_a.device_id, id_b.device_id}
    )
    host_a.add_doc("space:s", ["s"], {"removed": "c"})
    host_b = MemberHost([SpaceKey("s", OLD, 0)], members={id_a.device_id, id_b.device_id})
    host_b.add_doc("space:s", ["s"])
    a, b = pair(host_a, host_b, id_a, id_b)
    assert a.state == b.state == "open" and a.spaces == b.spaces == {"s"}
    assert a.handshake.proven == {"s": 0} and b.handshake.proven == {"s": 0}
    (event,) = [e for e in drain_events(b) if isinstance(e, SpaceKeyReceived)]
    assert (event.space, event.epoch, event.secret, event.sender) == ("s", 1, NEW, id_a.device_id)
    assert b.log.index(("doc", "space:s")) < b.log.index(("key", "s"))  # removals first
    assert not [e for e in drain_events(a) if isinstance(e, SpaceKeyReceived)]  # b's is older
    # b takes it and announces: a now sees the current epoch and sends nothing more
    host_b.spaces = [SpaceKey("s", NEW, 1), SpaceKey("s", OLD, 0)]
    host_b.docs_changed()
    b.docs_changed()
    exchange(a, b)
    assert a.handshake.proven == {"s": 1} and a.state == "open"
    assert not [e for e in drain_events(b) if isinstance(e, SpaceKeyReceived)]


def test_an_older_key_under_a_device_that_is_no_member_is_refused():
    id_a, thief = make_identity("a"), make_identity("thief")
    host_a = MemberHost([SpaceKey("s", NEW, 1), SpaceKey("s", OLD, 0)], members={id_a.device_id})
    host_t = MemberHost([SpaceKey("s", OLD, 0)], members={thief.device_id})
    t, a = pair(host_t, host_a, thief, id_a)
    assert a.closed is not None and a.closed.reason == "unauthorized"
    assert t.closed is not None and t.closed.reason == "unauthorized" and t.closed.by_peer


def test_a_removed_device_is_refused_whatever_key_it_shows():
    id_a, id_c = make_identity("a"), make_identity("c")
    members = {id_a.device_id, id_c.device_id}
    host_a = MemberHost([SpaceKey("s", NEW, 1)], members=members, removed={id_c.device_id})
    host_c = MemberHost([SpaceKey("s", NEW, 1)], members=members)  # even the current key
    c, a = pair(host_c, host_a, id_c, id_a)
    assert a.closed is not None and a.closed.reason == REMOVED
    assert c.closed is not None and c.closed.reason == REMOVED and c.closed.by_peer


def test_a_live_link_closes_when_the_peer_is_removed_and_keeps_other_spaces():
    id_a, id_c = make_identity("a"), make_identity("c")
    members = {id_a.device_id, id_c.device_id}
    other = SpaceKey("t", os.urandom(32))
    host_a = MemberHost([SpaceKey("s", OLD, 0), other], members=members)
    host_c = MemberHost([SpaceKey("s", OLD, 0), other], members=members)
    for host in (host_a, host_c):
        host.add_doc("space:s", ["s"])
        host.add_doc("space:t", ["t"])
    c, a = pair(host_c, host_a, id_c, id_a)
    assert a.spaces == {"s", "t"}
    host_a.removed.add(id_c.device_id)
    a.docs_changed()
    exchange(c, a)
    assert a.state == "open" and a.spaces == {"t"}  # s is simply not common any more
    host_a.edit("space:s", {"after": 1})
    a.local_update("space:s", host_a.docs["space:s"].get_update(), "local")
    exchange(c, a)
    assert "after" not in host_c.values("space:s")
    host_a.leave("t")
    a.docs_changed()
    exchange(c, a)
    assert a.closed is not None and a.closed.reason == REMOVED


def test_no_key_for_a_peer_that_does_not_take_keys():
    id_a, id_b = make_identity("a"), make_identity("b")
    members = {id_a.device_id, id_b.device_id}
    host_a = MemberHost([SpaceKey("s", NEW, 1), SpaceKey("s", OLD, 0)], members=members)
    host_b = MemberHost([SpaceKey("s", OLD, 0)], members=members)
    for host in (host_a, host_b):
        host.add_doc("space:s", ["s"])
    a, b = pair(host_a, host_b, id_a, id_b, b_takes_keys=False)
    assert a.state == b.state == "open"  # still admitted: a member
    assert ("key", "s") not in b.log


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "space-key", "space": "s", "epoch": 1, "secret": b"short"},
        {"t": "space-key", "space": "s", "epoch": -1, "secret": bytes(32)},
        {"t": "space-key", "epoch": 1, "secret": bytes(32)},
    ],
)
def test_malformed_space_key_messages_are_protocol_errors(msg):
    with pytest.raises(PeerProtocolError) as err:
        messages.validate_inner(msg)
    assert err.value.reason == "protocol-error"


def test_a_key_is_taken_only_with_a_signed_record_of_a_device_not_removed():
    """Keys handed over a link must be vouched for by a signed `keys` record in the space
    document, of a member that is not removed. A device that rotates the key itself (a thief
    who expects the removal) gets its key taken only until its removal arrives: then its record
    stops counting, the space admits no newcomer on that key, and the remover's key wins
    whatever the epochs."""
    a, c, x = make_identity("a"), make_identity("c"), make_identity("x")
    space = Space(id="s", secret=b"\x05" * 32, name="S", joined=0.0)
    for who in (a, c):
        space.doc.set_member(who.device_id, who.name)
    k1 = b"\x01" * 32
    assert not adopt_key(space, a.device_id, 1, k1, "ME")  # no record vouches for it
    commit_key(space, 1, k1, a)
    assert not adopt_key(space, x.device_id, 1, k1, "ME")  # not a member
    assert adopt_key(space, a.device_id, 1, k1, "ME") and space.epoch == 1
    # a record that names A but is signed by C counts for nothing
    forged = b"\x0f" * 32
    commit_key(space, 7, forged, c)
    entries = space.doc.doc.get("keys", type=Map)
    entries[key_check(forged)] = {**entries[key_check(forged)], "by": a.device_id}
    assert valid_keys(space) == {key_check(k1): 1}
    assert not adopt_key(space, a.device_id, 7, forged, "ME")
    # C rotates ahead of its removal, to a far epoch: taken while C is a member
    kc = b"\x09" * 32
    commit_key(space, 9, kc, c)
    assert adopt_key(space, c.device_id, 9, kc, "ME") and space.epoch == 9
    assert refusal(space, "NEWCOMER", 9) is None and not current_key_invalid(space)
    # A removes C with its own key at epoch 2: C's record stops counting
    space.doc.remove_device(c.device_id, a.device_id, 2)
    k2 = b"\x02" * 32
    commit_key(space, 2, k2, a)
    assert current_key_invalid(space)
    assert refusal(space, "NEWCOMER", 9) == "unauthorized"  # C's key admits nobody new
    assert refusal(space, a.device_id, 0) is None  # members still meet, and get the key
    assert refusal(space, c.device_id, 9) == REMOVED
    assert not adopt_key(space, c.device_id, 2, k2, "ME")  # not from the removed device
    assert adopt_key(space, a.device_id, 2, k2, "ME") and space.epoch == 2
    assert not current_key_invalid(space)
    assert [k.epoch for k in space.previous] == [1, 0][:MAX_PREVIOUS]  # C's key is not kept
    # two members that rotated apart at one epoch converge on the smaller check, either order
    b = make_identity("b")
    space.doc.set_member(b.device_id, "b")
    k3a, k3b = b"\x03" * 32, b"\x04" * 32
    commit_key(space, 3, k3a, a)
    commit_key(space, 3, k3b, b)
    first, second = sorted([(k3a, a), (k3b, b)], key=lambda kv: key_check(kv[0]))
    assert adopt_key(space, second[1].device_id, 3, second[0], "ME")
    assert adopt_key(space, first[1].device_id, 3, first[0], "ME")
    assert not adopt_key(space, second[1].device_id, 3, second[0], "ME")
    assert space.secret == first[0]


def test_malformed_removed_entries_are_ignored():
    doc = SpaceDoc()
    doc.doc.get("removed", type=Map)["X"] = "not a map"
    doc.doc.get("removed", type=Map)["Y"] = {"by": 3, "epoch": "no"}
    assert doc.removed() == {"Y": {"by": None, "at": None, "epoch": 0}}
    assert not doc.is_removed("X") and doc.is_removed("Y")


def test_invites_carry_the_key_epoch_and_older_codes_read_as_epoch_0():
    invite = Invite("s", "S", bytes(32), "D", epoch=3)
    assert decode_invite(encode_invite(invite)).epoch == 3
    assert decode_invite(encode_invite(Invite("s", "S", bytes(32), "D"))).epoch == 0


# -- real daemon processes: the laptop is taken while running (kill -9), its copy started -------
def proc_rows(daemon) -> list[dict]:
    return json.loads(pd(daemon.socket_path, "peers", "--json"))["peers"]


def endpoint_of(daemon, env_id: str, index: int) -> str | None:
    env = export(daemon, env_id)
    return env["routes"][index]["endpoint"] if env else None


def test_real_processes_stolen_laptop(daemons, fixture_dir):
    ports = [free_port() for _ in range(3)]
    a, b, c = daemons.new(), daemons.new(), daemons.new()
    peers = {0: [], 1: [ports[0]], 2: [ports[0], ports[1]]}
    for i, d in enumerate((a, b, c)):
        d.argv += ["--listen", f"{LOCAL}:{ports[i]}", "--no-mdns", "--name", "abc"[i]]
        for port in peers[i]:
            d.argv += ["--peer", f"{LOCAL}:{port}"]
        d.start()
    devices = [json.loads(pd(d.socket_path, "status", "--json"))["device"] for d in (a, b, c)]
    space = pd(a.socket_path, "space", "create", "Procs").strip()
    for d in (b, c):
        code = pd(a.socket_path, "space", "invite", space).strip()
        assert pd(d.socket_path, "space", "join", code).strip() == space
    env_id = pd(a.socket_path, "env", "import", str(fixture_dir / ENV_FILE)).strip()
    pd(a.socket_path, "env", "share", env_id, "--space", space)
    processes_converged([a, b, c], env_id)

    c.kill9()  # taken while running
    out = pd(a.socket_path, "space", "remove-device", space, devices[2])
    assert out.startswith(f"removed {devices[2]} from space {space}")
    patch = json.dumps([{"op": "replace", "path": "/routes/0/endpoint", "value": "after"}])
    pd(a.socket_path, "env", "patch", env_id, "-", input=patch)
    until_sync(lambda: endpoint_of(b, env_id, 0) == "after", what="a -> b", while_down=True)

    thief = daemons.new()
    shutil.copytree(c.data_dir, thief.data_dir)
    thief.argv += ["--listen", f"{LOCAL}:{free_port()}", "--no-mdns"]
    thief.argv += ["--peer", f"{LOCAL}:{ports[0]}", "--peer", f"{LOCAL}:{ports[1]}"]
    thief.start()

    def refused_by_both() -> bool:
        rows = proc_rows(thief)
        return all(
            any(
                (r["device"] == device or r["address"] == f"{LOCAL}:{port}")
                and r["state"] == "disconnected"
                and r["reason"] == REMOVED
                for r in rows
            )
            for device, port in zip(devices[:2], ports[:2], strict=True)
        )

    until_sync(refused_by_both, what="a and b refuse the copy", while_down=True)
    assert endpoint_of(thief, env_id, 0) != "after"
    assert not any(r["state"] == "connected" for r in proc_rows(thief))
    assert thief.stop() == 0 and a.stop() == 0 and b.stop() == 0


def test_the_hub_remembers_which_tokens_a_device_used_across_restarts(tmp_path):
    space_doc = SpaceDoc()

    class Docs:
        def __init__(self, store):
            self.store = store

        def get_doc(self, space_id, doc_id):
            return space_doc.doc if (space_id, doc_id) == ("s", "space:s") else None

    store = Store.open(tmp_path / "hub")
    try:
        removals = Removals(Docs(store))
        removals.note("C", "token-c")
        removals.note("A", "token-a")
        assert not removals.refused("s", "C", "token-c")  # nothing removed yet
    finally:
        store.close()
    space_doc.remove_device("C", "A", 1)
    store = Store.open(tmp_path / "hub")
    try:
        removals = Removals(Docs(store))
        assert removals.refused("s", "C", "other")  # the device, whatever its token
        assert removals.refused("s", "THIEF", "token-c")  # its token, whatever the device
        assert removals.refused("s", None, "token-c")  # a Yjs client with that token
        assert not removals.refused("s", "A", "token-a")
        assert not removals.refused("t", "C", "token-c")  # another space
        assert removals.blocked_tokens("s") == {"token-c"}
    finally:
        store.close()
