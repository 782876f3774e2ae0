"""Spaces, invites and sharing: in-process daemons (Store + Registry + SpacesService each) joined
by an in-memory relay that plays the peer link's part of the SyncHost contract, then the CLI
against in-process daemons (no network: single-daemon behaviour)."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import tempfile
from collections import deque
from functools import partial
from pathlib import Path

import pytest
import trio
from helpers import run_cli
from modelutil import load
from pycrdt import Map

from peerdaemon import cli
from peerdaemon.api.protocol import OpError, Pending
from peerdaemon.core.events import EventLog
from peerdaemon.core.identity import load_or_create_identity
from peerdaemon.core.registry import Registry
from peerdaemon.daemon.supervisor import DaemonConfig, serve
from peerdaemon.model import prepare
from peerdaemon.operations import Operations
from peerdaemon.spaces import (
    Invite,
    InviteError,
    SpacesService,
    decode_invite,
    encode_invite,
    parse_address,
)
from peerdaemon.store import Store

ENV_FILE = "test-env.json"


# --- in-process devices ----------------------------------------------------------------------------
class Node:
    """One device: its own store (in its own dir), registry, Service and SpacesService."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.stopped: trio.Event | None = None

    async def start(self, nursery: trio.Nursery) -> Node:
        self.store = Store.open(self.path)
        self.events = EventLog()
        self.registry = Registry(self.store, self.events)
        self.registry.load()
        self.identity = load_or_create_identity(self.store, self.name)
        self.spaces = SpacesService(self.registry, self.store, self.identity, self.events)
        self.spaces.load()
        self.service = Operations(self.registry, data_dir=self.path, socket_path=self.path / "s")
        self.spaces.register(self.service)
        self.scope = await nursery.start(self._run_store)
        return self

    async def _run_store(self, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        self.stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await self.store.run()
        finally:
            self.store.close()
            self.stopped.set()

    async def stop(self) -> None:
        self.scope.cancel()
        assert self.stopped is not None
        await self.stopped.wait()

    @property
    def device(self) -> str:
        return self.identity.device_id

    async def op(self, op: str, **args: object) -> object:
        """A socket operation through the daemon's Service; waits for durability."""
        result = await self.service.handle(op, args, None)
        if isinstance(result, Pending):
            await result.wait()
            return result.result
        return result

    def import_env(self, env: dict | None = None, *, new_id: bool = False) -> str:
        prepared, _ = prepare(copy.deepcopy(env or load(ENV_FILE)))
        if new_id:
            prepared["uuid"] = f"env-{self.name}-{len(self.registry.envs)}"
        self.registry.create(prepared["uuid"], prepared, "local")
        return prepared["uuid"]

    def edit(self, env_id: str, change) -> None:
        env = copy.deepcopy(self.registry.export(env_id))
        change(env)
        prepared, _ = prepare(env, env_id)
        self.registry.apply(env_id, prepared, "local")

    def export(self, env_id: str) -> dict:
        return self.registry.export(env_id)

    def space(self, space_id: str) -> dict:
        return next(s for s in self.spaces.list_spaces() if s["id"] == space_id)


class Relay:
    """Stands in for a peer link between two nodes: the initial (and on-change) state-vector
    exchange of the syncable docs of the spaces both know, then every listener update passed on,
    with `allowed` checked by the sender and by the receiver against the spaces the link was
    set up with (`linked`, renewed at each exchange, as a handshake would). Synchronous:
    `flush()` delivers."""

    def __init__(self, a: Node, b: Node) -> None:
        self.a, self.b = a, b
        self.online = True
        self.queue: deque = deque()
        self.delivered = 0
        self.linked: set[str] = set()
        for src, dst in ((a, b), (b, a)):
            src.spaces.add_listener(partial(self._on_change, src, dst))
            src.spaces.add_docs_listener(self._on_docs)

    def common(self) -> set[str]:
        keys_a = {(k.id, k.secret) for k in self.a.spaces.space_keys()}
        keys_b = {(k.id, k.secret) for k in self.b.spaces.space_keys()}
        return {space_id for space_id, _ in keys_a & keys_b}

    def _on_change(self, src: Node, dst: Node, doc_id: str, update: bytes, origin: str) -> None:
        if (
            self.online
            and origin != f"peer:{dst.device}"
            and src.spaces.allowed(doc_id, self.linked)
        ):
            self.queue.append((src, dst, doc_id, update))

    def _on_docs(self) -> None:
        if self.online:
            self.queue.append("sync")

    def _sync(self) -> None:
        common = self.linked = self.common()
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            for doc_id in dst.spaces.docs_of(common):
                sv = dst.spaces.state_vector(doc_id)
                if sv is not None and src.spaces.allowed(doc_id, common):
                    self.queue.append((src, dst, doc_id, src.spaces.diff(doc_id, sv)))

    def flush(self) -> None:
        while self.queue:
            item = self.queue.popleft()
            if item == "sync":
                self._sync()
                continue
            src, dst, doc_id, update = item
            if self.online and dst.spaces.allowed(doc_id, self.linked):
                dst.spaces.apply(doc_id, update, f"peer:{src.device}")
                self.delivered += 1

    def pause(self) -> None:
        self.online = False
        self.queue.clear()  # what was in flight is lost; the next connection catches up

    def connect(self) -> None:
        self.online = True
        self.queue.append("sync")
        self.flush()


def flush(*relays: Relay) -> None:
    """Deliver until every relay is quiet (a node may forward what another relay brought)."""
    while any(r.queue for r in relays):
        for relay in relays:
            relay.flush()


@pytest.fixture
async def nodes(nursery, tmp_path):
    made: list[Node] = []

    async def make(name: str) -> Node:
        node = await Node(tmp_path / name, name).start(nursery)
        made.append(node)
        return node

    yield make
    for node in made:
        if not node.stopped.is_set():
            await node.stop()


async def space_of_two(nodes) -> tuple[Node, Node, Relay, str]:
    """A creates a space and invites B, who joins; they are connected."""
    a, b = await nodes("a"), await nodes("b")
    space_id = (await a.op("space.create", name="Team"))["id"]
    code = (await a.op("space.invite", space=space_id, addresses=["192.0.2.1:22000"]))["code"]
    assert (await b.op("space.join", code=code)) == {"id": space_id, "name": "Team"}
    relay = Relay(a, b)
    relay.connect()
    return a, b, relay, space_id


def set_endpoint(index: int, value: str):
    def change(env: dict) -> None:
        env["routes"][index]["endpoint"] = value

    return change


# --- invite codes --------------------------------------------------------------------------------
INVITE = Invite(
    space_id="abcdefghijklmnop",
    name="Team ✓",
    secret=bytes(range(32)),
    inviter="AAAAAAA-BBBBBBB-CCCCCCC-DDDDDDD-EEEEEEE-FFFFFFF-GGGGGGG-HHH",
    addresses=("192.0.2.5:22000", "[2001:db8::1]:22000"),
    hub="https://hub.example",
)


def test_invite_round_trip_and_tolerant_reading():
    code = encode_invite(INVITE)
    assert code.startswith("pd1-") and code == code.lower() and " " not in code
    assert decode_invite(code) == INVITE
    wrapped = code.upper()[:40] + "\n  " + code.upper()[40:]  # re-cased, wrapped by a mailer
    assert decode_invite(wrapped) == INVITE
    bare = Invite("s", "n", b"k" * 32, "d")
    assert decode_invite(encode_invite(bare)) == bare


def _mistype(code: str, pos: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    ch = code[pos]
    return code[:pos] + alphabet[(alphabet.index(ch) + 1) % 32] + code[pos + 1 :]


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda c: _mistype(c, 20), "mistyped"),
        (lambda c: _mistype(c, len(c) - 1), "mistyped"),
        (lambda c: c[:-8], "mistyped"),
        (lambda c: c[:-1], "mistyped"),
        (lambda c: c[:30] + "0" + c[31:], "invalid character '0' at position 31"),
        (lambda c: c[:30] + "!" + c[31:], "invalid character"),
        (lambda c: "pd2-" + c[4:], "newer peerdaemon"),
        (lambda c: "pd0-" + c[4:], "unknown invite code format"),
        (lambda c: c[4:], "not a peerdaemon invite code"),
        (lambda c: "", "empty"),
        (lambda c: "pd1-", "mistyped"),
    ],
)
def test_damaged_invite_codes_give_clear_errors(mangle, message):
    with pytest.raises(InviteError, match=message):
        decode_invite(mangle(encode_invite(INVITE)))


def test_invite_with_a_valid_checksum_but_no_invitation():
    import cbor2

    from peerdaemon.spaces.invite import _checksum

    for body in (cbor2.dumps([1, 2]), cbor2.dumps({"s": "x", "n": "y", "k": b"short", "d": "z"})):
        raw = base64.b32encode(body + _checksum(body)).decode().rstrip("=").lower()
        with pytest.raises(InviteError, match="invitation"):
            decode_invite("pd1-" + raw)


def test_parse_address():
    assert parse_address("host.local:22000") == ("host.local", 22000)
    assert parse_address("[2001:db8::1]:9") == ("2001:db8::1", 9)
    for bad in ("host", "host:", ":1", "h:0", "h:70000", "2001:db8::1:22", "h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


# --- spaces between devices ------------------------------------------------------------------------
async def test_create_invite_join_and_membership_converges(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    for node in (a, b):
        space = node.space(space_id)
        assert space["name"] == "Team"
        assert {m["device"]: m["name"] for m in space["members"]} == {a.device: "a", b.device: "b"}
    assert [k.id for k in b.spaces.space_keys()] == [space_id]
    assert b.spaces.space_keys() == a.spaces.space_keys()
    peers = b.spaces.invite_addresses()
    assert [(p.space_id, p.device_id, p.address) for p in peers] == [
        (space_id, a.device, "192.0.2.1:22000")
    ]
    assert a.spaces.invite_addresses() == []
    assert b.events.since(0)[-1]["type"] == "space-joined"


async def test_share_appears_on_the_other_and_edits_converge_both_ways(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    docs_changes = []
    b.spaces.add_docs_listener(lambda: docs_changes.append(1))
    result = await a.op("env.share", id=env_id, space="Team")  # by name
    assert result == {"id": env_id, "space": space_id, "copy": False}
    relay.flush()
    assert docs_changes  # B's peer links are told to sync the new doc
    assert b.export(env_id) == a.export(env_id)
    assert b.spaces.env_space(env_id) == space_id
    assert [e["id"] for e in b.space(space_id)["environments"]] == [env_id]
    created = [e for e in b.events.since(0) if e["type"] == "environment-created"]
    assert created[-1]["data"] == {"id": env_id, "origin": f"peer:{a.device}"}

    a.edit(env_id, set_endpoint(0, "from-a"))
    relay.flush()
    b.edit(env_id, set_endpoint(1, "from-b"))
    relay.flush()
    for node in (a, b):
        routes = node.export(env_id)["routes"]
        assert (routes[0]["endpoint"], routes[1]["endpoint"]) == ("from-a", "from-b")
    assert a.export(env_id) == b.export(env_id)


async def test_a_peer_update_is_decoded_once(nodes, monkeypatch):
    """The spaces model gate and the registry's stray check read the same items: each update
    from a peer is decoded once, also when it writes text (the stray check's case)."""
    from peerdaemon.model import migrations, strays

    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    await a.op("env.share", id=env_id, space=space_id)
    relay.flush()
    decoded: list[bytes] = []
    for module in (strays, migrations):
        real = module.read_items

        def counting(update, real=real):
            decoded.append(bytes(update))
            return real(update)

        monkeypatch.setattr(module, "read_items", counting)

    def set_body(env: dict) -> None:
        env["routes"][1]["responses"][0]["body"] += "ü"

    for change in (set_endpoint(0, "once"), set_body):
        decoded.clear()
        a.edit(env_id, change)
        relay.flush()
        assert decoded and len(decoded) == len(set(decoded)), "an update was decoded twice"
    assert b.export(env_id) == a.export(env_id)


async def test_space_doc_reads_follow_every_write(nodes):
    """`state` and `model` are remembered between writes: a local write, a peer's update and a
    peer's deletion (no new item, only a delete set) are all seen at once."""
    a, b, relay, space_id = await space_of_two(nodes)
    doc = b.spaces.spaces[space_id].doc
    assert doc.state("e1") is None and doc.model() == a.spaces.spaces[space_id].doc.model()
    doc.set_state("e1", "unshared", "me")  # a local write
    assert doc.state("e1") == "unshared"
    remote = a.spaces.spaces[space_id].doc

    def from_peer(write) -> None:
        before = remote.doc.get_state()
        write()
        b.spaces.apply(f"space:{space_id}", remote.doc.get_update(before), f"peer:{a.device}")

    from_peer(lambda: remote.set_state("e2", "shared", "them"))
    assert doc.state("e2") == "shared"
    from_peer(lambda: remote.doc.get("models", type=Map).update({"99": {"by": "them"}}))
    assert doc.model() == 99
    from_peer(lambda: remote.doc.get("environments", type=Map).pop("e2"))
    assert doc.state("e2") is None  # a delete set alone


async def test_an_edit_that_overtakes_the_full_state_is_kept(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    relay.pause()
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    base = a.registry.state_update(env_id)
    edits = []
    a.spaces.add_listener(lambda doc, update, origin: doc == env_id and edits.append(update))
    a.edit(env_id, set_endpoint(0, "overtaking"))
    peer = f"peer:{a.device}"
    b.spaces.apply(f"space:{space_id}", a.spaces.diff(f"space:{space_id}", b"\x00"), peer)
    assert b.spaces.state_vector(env_id) == b"\x00"  # shared, not received yet
    assert b.spaces.diff(env_id, b"\x00") == b"\x00\x00"
    for update in edits:
        b.spaces.apply(env_id, update, peer)  # cannot create it alone: kept, no error
    assert env_id not in b.registry.envs
    with pytest.raises(ValueError):
        b.spaces.apply(env_id, b"\x01garbage", peer)
    b.spaces.apply(env_id, base, peer)  # the state from before the edit
    assert b.export(env_id) == a.export(env_id)
    assert b.export(env_id)["routes"][0]["endpoint"] == "overtaking"
    assert b.spaces.env_space(env_id) == space_id


async def test_concurrent_offline_edits_merge_without_loss(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    relay.pause()

    def a_change(env: dict) -> None:
        env["routes"][0]["endpoint"] = "offline-a"
        env["routes"][0]["responses"][0]["body"] = "A" + env["routes"][0]["responses"][0]["body"]

    def b_change(env: dict) -> None:
        env["routes"][2]["endpoint"] = "offline-b"
        env["routes"][0]["responses"][0]["body"] += "B"
        env["name"] = "renamed by b"

    a.edit(env_id, a_change)
    b.edit(env_id, b_change)
    other = b.import_env(new_id=True)  # shared while apart, too
    b.spaces.share(other, space_id)
    assert relay.delivered > 0 and not relay.queue
    before = relay.delivered
    relay.flush()
    assert relay.delivered == before  # nothing crosses while paused
    assert a.export(env_id)["routes"][2]["endpoint"] != "offline-b"

    relay.connect()
    env = a.export(env_id)
    assert env == b.export(env_id)
    assert env["routes"][0]["endpoint"] == "offline-a"
    assert env["routes"][2]["endpoint"] == "offline-b"
    assert env["name"] == "renamed by b"
    body = env["routes"][0]["responses"][0]["body"]
    assert body.startswith("A") and body.endswith("B")
    assert a.export(other) == b.export(other)


async def test_unshare_keeps_a_local_copy_everywhere_and_stops_syncing(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    assert (await b.op("env.unshare", id=env_id)) == {"id": env_id, "space": space_id}
    relay.flush()
    for node in (a, b):
        assert env_id in node.registry.envs
        assert node.spaces.env_space(env_id) is None
        assert env_id not in node.spaces.docs_of([space_id])
        assert not node.spaces.allowed(env_id, [space_id])
        assert node.space(space_id)["environments"] == []
    a.edit(env_id, set_endpoint(0, "only-a"))
    relay.flush()
    assert b.export(env_id)["routes"][0]["endpoint"] != "only-a"
    unshared = [e for e in a.events.since(0) if e["type"] == "environment-unshared"]
    assert unshared[-1]["data"] == {"id": env_id, "space": space_id, "origin": f"peer:{b.device}"}
    with pytest.raises(OpError) as info:
        await a.op("env.unshare", id=env_id)
    assert info.value.code == "not-shared"


async def test_delete_removes_everywhere_and_a_late_update_does_not_resurrect(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    late = b.registry.state_update(env_id)  # as a slow peer could still send it
    assert (await a.op("env.delete", id=env_id)) == {"deleted": True}
    relay.flush()
    for node in (a, b):
        assert env_id not in node.registry.envs
        assert not node.spaces.allowed(env_id, [space_id])
        assert node.spaces.state_vector(env_id) is None
    b.spaces.apply(env_id, late, f"peer:{a.device}")  # ignored
    a.spaces.apply(env_id, late, f"peer:{b.device}")
    assert env_id not in a.registry.envs and env_id not in b.registry.envs
    deleted = [e for e in b.events.since(0) if e["type"] == "environment-deleted"]
    assert deleted[-1]["data"] == {"id": env_id, "origin": f"peer:{a.device}"}


async def test_delete_while_apart_wins_over_offline_edits(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    relay.pause()
    b.edit(env_id, set_endpoint(0, "edited while apart"))
    await a.op("env.delete", id=env_id)
    relay.connect()
    assert env_id not in a.registry.envs and env_id not in b.registry.envs


async def test_deleted_state_survives_a_restart(nodes, nursery):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    relay.pause()
    await a.op("env.delete", id=env_id)
    await b.stop()  # B never heard of the deletion...
    b2 = await Node(b.path, "b").start(nursery)
    assert env_id in b2.registry.envs  # ...so it still has the environment
    relay2 = Relay(a, b2)
    relay2.connect()
    assert env_id not in b2.registry.envs
    await b2.stop()
    b3 = await Node(b.path, "b").start(nursery)
    assert env_id not in b3.registry.envs
    assert b3.spaces.state_vector(env_id) is None
    await b3.stop()


async def test_leave_forgets_the_space_and_keeps_local_copies(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    assert (await b.op("space.leave", space=space_id)) == {"id": space_id, "left": True}
    relay.flush()
    assert [m["device"] for m in a.space(space_id)["members"]] == [a.device]
    assert b.spaces.list_spaces() == [] and b.spaces.space_keys() == []
    assert env_id in b.registry.envs and b.spaces.env_space(env_id) is None
    assert not b.spaces.allowed(env_id, [space_id])
    assert not b.spaces.allowed(f"space:{space_id}", [space_id])
    a.edit(env_id, set_endpoint(0, "after leave"))
    relay.flush()
    assert b.export(env_id)["routes"][0]["endpoint"] != "after leave"
    assert b.store.get_setting("spaces") == {}
    with pytest.raises(OpError) as info:
        await b.op("space.leave", space=space_id)
    assert info.value.code == "not-found"


async def test_copy_share_keeps_the_original_local(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    result = await a.op("env.share", id=env_id, space=space_id, copy=True)
    copy_id = result["id"]
    assert copy_id != env_id and result["copy"] is True
    relay.flush()
    assert a.spaces.env_space(env_id) is None and a.spaces.env_space(copy_id) == space_id
    assert copy_id in b.registry.envs and env_id not in b.registry.envs
    original = a.export(env_id)
    duplicate = b.export(copy_id)
    assert duplicate["uuid"] == copy_id
    assert {**duplicate, "uuid": env_id} == original
    a.edit(copy_id, set_endpoint(0, "copy edited"))
    relay.flush()
    assert b.export(copy_id)["routes"][0]["endpoint"] == "copy edited"
    assert a.export(env_id)["routes"][0]["endpoint"] != "copy edited"


async def test_three_devices_converge_through_the_middle_one(nodes):
    a, b, relay_ab, space_id = await space_of_two(nodes)
    c = await nodes("c")
    code = b.spaces.invite(space_id, [])  # invited by B; C never talks to A directly
    c.spaces.join(code)
    relay_bc = Relay(b, c)
    relay_bc.connect()
    flush(relay_ab, relay_bc)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    flush(relay_ab, relay_bc)
    assert c.export(env_id) == a.export(env_id)
    members = {m["device"] for m in a.space(space_id)["members"]}
    assert members == {a.device, b.device, c.device}

    relay_ab.pause()
    relay_bc.pause()
    a.edit(env_id, set_endpoint(0, "a offline"))
    c.edit(env_id, set_endpoint(1, "c offline"))
    relay_bc.connect()
    relay_ab.connect()
    flush(relay_ab, relay_bc)
    exports = [n.export(env_id) for n in (a, b, c)]
    assert exports[0] == exports[1] == exports[2]
    assert exports[0]["routes"][0]["endpoint"] == "a offline"
    assert exports[0]["routes"][1]["endpoint"] == "c offline"

    await c.op("env.delete", id=env_id)
    flush(relay_ab, relay_bc)
    assert all(env_id not in n.registry.envs for n in (a, b, c))


async def test_spaces_and_shares_survive_a_restart(nodes, nursery):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    a.spaces.share(env_id, space_id)
    relay.flush()
    device = b.device
    await b.stop()
    b2 = await Node(b.path, "b").start(nursery)
    assert b2.device == device
    assert b2.spaces.env_space(env_id) == space_id
    assert b2.space(space_id)["name"] == "Team"
    relay2 = Relay(a, b2)
    relay2.connect()
    a.edit(env_id, set_endpoint(0, "after restart"))
    relay2.flush()
    assert b2.export(env_id)["routes"][0]["endpoint"] == "after restart"
    await b2.stop()


async def test_a_local_environment_with_the_same_id_is_not_merged(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    env_id = a.import_env()
    b.import_env()  # B imported the same file on its own: same uuid, independent document
    b.edit(env_id, set_endpoint(0, "b's own"))
    a.spaces.share(env_id, space_id)
    relay.flush()
    assert b.export(env_id)["routes"][0]["endpoint"] == "b's own"
    assert b.spaces.env_space(env_id) is None
    assert b.space(space_id)["environments"] == [
        {"id": env_id, "present": True, "name": "Test env", "conflict": True}
    ]
    await b.op("env.share", id=env_id, space=space_id)  # B's explicit choice: merge them
    relay.flush()
    assert a.export(env_id) == b.export(env_id)


async def test_space_doc_listener_and_bad_updates(nodes):
    a, b, relay, space_id = await space_of_two(nodes)
    seen = []
    token = a.spaces.add_listener(lambda *args: seen.append(args))
    await a.op("space.create", name="Other")
    assert seen and seen[-1][0].startswith("space:") and seen[-1][2] == "local"
    a.spaces.remove_listener(token)
    with pytest.raises(ValueError):
        b.spaces.apply(f"space:{space_id}", b"\x01garbage", "peer:x")
    with pytest.raises(ValueError):
        a.spaces.diff(f"space:{space_id}", b"\x05zz")
    b.spaces.apply("space:unknown", b"\x01\x00", "peer:x")  # not ours: ignored
    assert a.spaces.state_vector("nope") is None
    assert a.spaces.diff("nope", b"\x00") == b"\x00\x00"


async def test_operation_errors(nodes):
    a = await nodes("a")
    env_id = a.import_env()
    with pytest.raises(OpError) as info:
        await a.op("space.join", code="pd1-abcdefgh")
    assert info.value.code == "bad-invite" and "mistyped" in info.value.message
    space_id = (await a.op("space.create", name="Team"))["id"]
    code = (await a.op("space.invite", space="Team"))["code"]
    with pytest.raises(OpError) as info:
        await a.op("space.join", code=code)
    assert info.value.code == "exists"
    with pytest.raises(OpError) as info:  # a second space of that name: refused (exists)
        await a.op("space.create", name="Team")
    assert info.value.code == "exists" and "'Team 2'" in info.value.message
    b = await nodes("b")  # joining another device's space of the same name is not refused
    await b.op("space.create", name="Team")
    await a.op("space.join", code=(await b.op("space.invite", space="Team"))["code"])
    with pytest.raises(OpError) as info:
        await a.op("space.invite", space="Team")
    assert info.value.code == "ambiguous"
    assert (await a.op("space.invite", space=space_id[:6]))["code"].startswith("pd1-")
    for op, args, code_ in [
        ("space.create", {"name": ""}, "bad-request"),
        ("space.invite", {"space": "nope"}, "not-found"),
        ("space.invite", {"space": space_id, "addresses": ["nohost"]}, "bad-request"),
        ("env.share", {"id": "missing", "space": space_id}, "not-found"),
        ("env.share", {"id": env_id, "space": "nope"}, "not-found"),
        ("env.unshare", {"id": env_id}, "not-shared"),
    ]:
        with pytest.raises(OpError) as info:
            await a.op(op, **args)
        assert info.value.code == code_, (op, args)
    await a.op("env.share", id=env_id, space=space_id)
    with pytest.raises(OpError) as info:
        await a.op("env.share", id=env_id, space=space_id)
    assert info.value.code == "exists" and "--copy" in info.value.message


async def test_rename_identity_and_status(nodes):
    """A rename (`config set name`, daemon/live.py) reaches every space's member list."""
    a, b, relay, space_id = await space_of_two(nodes)
    assert (await a.op("identity"))["name"] == "a"
    with pytest.raises(OpError) as info:
        a.spaces.set_name("")
    assert info.value.code == "bad-request"
    for ticket in a.spaces.set_name("workstation"):
        await ticket.wait()
    relay.flush()
    names = {m["device"]: m["name"] for m in b.space(space_id)["members"]}
    assert names[a.device] == "workstation"
    ident = await a.op("identity")
    assert ident["device"] == a.device and ident["name"] == "workstation"
    assert len(ident["public_key"]) == 32
    status = await a.op("status")
    assert (status["device"], status["name"], status["spaces"]) == (a.device, "workstation", 1)


# --- the CLI against in-process daemons ----------------------------------------------------------
@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pd"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def start_daemon(nursery, base: Path, n: int, name: str):
    config = DaemonConfig(base / f"data{n}", base / f"run{n}" / "pd.sock", name=name)
    return await nursery.start(serve, config)


async def test_cli_spaces_sharing_and_config(nursery, base, capsys, fixture_dir):
    d1 = await start_daemon(nursery, base, 1, "alpha")
    d2 = await start_daemon(nursery, base, 2, "beta")
    s1, s2 = ["--socket", str(d1.config.socket_path)], ["--socket", str(d2.config.socket_path)]

    assert await run_cli(*s1, "status") == 0
    out = capsys.readouterr().out
    assert f"device:       alpha ({d1.identity.device_id})\n" in out

    assert await run_cli(*s1, "space", "create", "Team") == 0
    space_id = capsys.readouterr().out.strip()
    assert space_id in d1.spaces.spaces
    assert await run_cli(*s1, "space", "invite", "Team", "--address", "192.0.2.1:22000") == 0
    code = capsys.readouterr().out.strip()
    assert decode_invite(code).addresses == ("192.0.2.1:22000",)

    assert await run_cli(*s2, "space", "join", code[:-3] + "aaa") == 1
    err = capsys.readouterr().err
    assert err.startswith("peerdaemon: ") and "mistyped" in err and err.count("\n") == 1
    assert await run_cli(*s2, "space", "join", code, "--no-wait") == 0  # no peer link here
    assert capsys.readouterr().out.strip() == space_id
    assert await run_cli(*s2, "space", "join", code) == 1
    assert "already in space" in capsys.readouterr().err

    assert await run_cli(*s2, "space", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "MEMBERS", "ENVIRONMENTS"]
    assert lines[1].split() == [space_id, "Team", "beta", "-"]  # A's doc arrives by sync

    env_file = str(fixture_dir / ENV_FILE)
    assert await run_cli(*s1, "env", "import", env_file) == 0
    env_id = capsys.readouterr().out.strip()
    assert await run_cli(*s1, "env", "share", env_id, "--space", "Team") == 0
    assert capsys.readouterr().out.strip() == env_id
    assert await run_cli(*s1, "env", "share", env_id, "--space", "Team", "--copy") == 0
    copy_id = capsys.readouterr().out.strip()
    assert copy_id != env_id
    assert await run_cli(*s1, "space", "list", "--json") == 0
    [space] = json.loads(capsys.readouterr().out)
    assert {e["id"] for e in space["environments"]} == {env_id, copy_id}
    assert [m["name"] for m in space["members"]] == ["alpha"]
    assert await run_cli(*s1, "space", "list") == 0
    assert "Test env,Test env" in capsys.readouterr().out

    assert await run_cli(*s1, "env", "unshare", env_id) == 0
    assert await run_cli(*s1, "env", "unshare", env_id) == 1
    assert "is not shared" in capsys.readouterr().err
    assert await run_cli(*s1, "env", "delete", copy_id) == 0
    assert d1.spaces.spaces[space_id].doc.state(copy_id) == "deleted"
    assert d1.spaces.spaces[space_id].doc.state(env_id) == "unshared"
    assert await run_cli(*s1, "env", "share", "nope", "--space", "Team") == 1
    assert "nope" in capsys.readouterr().err

    assert await run_cli(*s1, "config", "set", "name", "gamma") == 0
    assert capsys.readouterr().out == "name applied now (the running daemon reads no config file)\n"
    assert await run_cli(*s1, "config", "get", "name") == 0
    assert capsys.readouterr().out == "gamma\n"
    assert await run_cli(*s1, "config", "set", "colour", "red") == 1
    assert "unknown setting" in capsys.readouterr().err

    assert await run_cli(*s2, "space", "leave", space_id) == 0
    assert await run_cli(*s2, "space", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert await run_cli(*s2, "space", "leave", space_id) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["space"],
        ["space", "create"],
        ["space", "join"],
        ["env", "share", "x"],  # --space is required
        ["config", "set", "name"],
        ["config"],
    ],
)
def test_cli_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2


async def test_identity_and_name_survive_a_daemon_restart(base):
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, base, 1, "first")
        device = daemon.identity.device_id
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        config = DaemonConfig(base / "data1", base / "run1" / "pd.sock")  # no --name this time
        daemon = await nursery.start(serve, config)
        assert (daemon.identity.device_id, daemon.identity.name) == (device, "first")
        nursery.cancel_scope.cancel()


def test_run_passes_name_to_the_daemon(monkeypatch, tmp_path):
    calls = []

    def fake_run_daemon(config, **_log):
        calls.append(config.name)
        return 0

    import peerdaemon.daemon.supervisor as supervisor

    monkeypatch.setattr(supervisor, "run_daemon", fake_run_daemon)
    assert cli.main(["run", "--data-dir", str(tmp_path), "--socket", "/tmp/x.sock"]) == 0
    assert cli.main(["run", "--data-dir", str(tmp_path), "--name", "lab"]) == 0
    assert calls == [None, "lab"]
