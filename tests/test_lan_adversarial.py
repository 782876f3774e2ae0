"""A daemon's peer port against peers that misbehave (docs/peer-protocol.md, sections 2-4, 8).

A raw trio-websocket client, speaking the protocol by hand (its own identity, our sans-I/O
`Handshake` for the keys), sends garbage CBOR, text, oversized messages, messages before the
hello, skipped, replayed and tampered boxes, a bad Yjs update, a hello of another protocol or
model version, and a stranger's auth. Each time the daemon closes that link with the documented
reason (and the websocket close reason), and afterwards: its socket still answers, its documents
are unchanged, and its link to a real member daemon stayed up (same link, still syncing). A daemon
of another space gets `unauthorized` and no environment; a daemon process announcing protocol
version 2 gets `incompatible-version`, with both versions on the dialing side.

Only authenticated facts change a device's row in `peers`: a hello is a claim (a device id and
its public key are public), so a failure before the peer proved its key is the dialed address's,
or no row's at all for an incoming connection, and names from unproven hellos never show.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
from daemonproc import PYTHON, daemons_fixture, pd  # noqa: F401  (fixture)
from daemonutil import (
    FAST,
    Dev,
    base_fixture,  # noqa: F401  (fixture)
    converged,
    devs_fixture,  # noqa: F401  (fixture)
    make_space,
    wait_state,
)
from helpers import LOCAL, free_port, until_sync
from trio_websocket import ConnectionClosed, open_websocket

from peerdaemon.core.identity import Identity
from peerdaemon.model import FIRST_GATED_MODEL, MODEL_VERSION
from peerdaemon.peer import PeerConfig
from peerdaemon.peer.handshake import Handshake
from peerdaemon.peer.messages import SYNC_STEP1, SYNC_UPDATE, encode_sync
from peerdaemon.spaces import SpaceKey, decode_invite

MAX_MESSAGE = 64 * 1024
SMALL = PeerConfig(
    max_message=MAX_MESSAGE,
    backoff_initial=FAST.backoff_initial,
    backoff_max=FAST.backoff_max,
    connect_timeout=FAST.connect_timeout,
    close_grace=FAST.close_grace,
)
TIMEOUT = 10.0


class Lan:
    """Daemon `a` (the target, 64 KiB message limit) and member `b`, connected, sharing `env`."""

    a: Dev
    b: Dev
    space: str
    key: SpaceKey
    env: str
    before: dict
    b_link_since: float


async def lan_of_two(devs, nursery) -> Lan:
    lan = Lan()
    lan.a = await devs("a", SMALL).start(nursery)
    lan.b = await devs("b").start(nursery, lan.a)
    lan.space = (await lan.a.op("space.create", name="Team"))["id"]
    code = (await lan.a.op("space.invite", space=lan.space))["code"]
    await lan.b.op("space.join", code=code)
    lan.key = SpaceKey(lan.space, decode_invite(code).secret)  # what a raw member needs
    lan.env = await lan.a.import_env()
    await lan.a.op("env.share", id=lan.env, space=lan.space)
    lan.before = await converged([lan.a, lan.b], lan.env)
    lan.b_link_since = (await wait_state(lan.b, lan.a, "connected"))["since"]
    return lan


async def unaffected(lan: Lan) -> None:
    """The daemon still serves its socket, its document is unchanged, the member link is the
    same one as before and still carries edits."""
    status = await lan.a.op("status")
    assert status["environments"] == 1
    assert await lan.a.export(lan.env) == lan.before
    row = await lan.b.row(lan.a)
    assert row["state"] == "connected" and row["since"] == lan.b_link_since
    await lan.a.set_endpoint(lan.env, 0, "still-syncing")
    after = await converged([lan.a, lan.b], lan.env)
    assert after["routes"][0]["endpoint"] == "still-syncing"


async def wait_address(dev: Dev, address: str, state: str, reason: str) -> dict:
    """Wait until `dev`'s row for the dialed `address` is in `state` for `reason`."""
    with trio.fail_after(TIMEOUT):
        while True:
            for row in await dev.rows():
                if (row["address"], row["state"], row["reason"]) == (address, state, reason):
                    return row
            await trio.sleep(0.02)


class RawPeer:
    """A hand-driven dialer on one websocket: its own identity, our Handshake for the keys."""

    def __init__(self, ws, keys=(), name="raw"):
        self.ws = ws
        self.identity = Identity.generate(name)
        self.keys = list(keys)
        self.hs = Handshake(self.identity, lambda: self.keys, dialer=True, model=MODEL_VERSION)
        self.auth_box: bytes | None = None

    @property
    def device(self) -> str:
        return self.identity.device_id

    async def send(self, msg: dict) -> None:
        await self.ws.send_message(cbor2.dumps(msg))

    async def receive(self) -> dict:
        """The next message, opened if it is a box."""
        with trio.fail_after(TIMEOUT):
            raw = await self.ws.get_message()
        msg = cbor2.loads(raw)
        if msg["t"] == "box":
            assert self.hs.channel is not None
            return self.hs.channel.open(msg, 1 << 30)
        return msg

    async def hellos(self) -> None:
        """Send our hello, take the daemon's; the box of our auth is kept, not sent."""
        [hello] = self.hs.start()
        await self.ws.send_message(hello)
        with trio.fail_after(TIMEOUT):
            raw = await self.ws.get_message()
        msg = cbor2.loads(raw)
        assert msg["t"] == "hello", msg
        [self.auth_box] = self.hs.receive_hello(msg, raw)

    async def authenticate(self) -> list[dict]:
        """Send our auth; the daemon's auth and its first sync messages."""
        assert self.auth_box is not None
        await self.ws.send_message(self.auth_box)
        got = [await self.receive()]
        assert got[0]["t"] == "auth", got
        return got

    def seal(self, msg: dict) -> bytes:
        assert self.hs.channel is not None
        return self.hs.channel.seal(msg)

    async def closed_with(self, reason: str, *, close_message: bool = True) -> list[dict]:
        """Read until the daemon hangs up: its close message (if expected) carries `reason`,
        and so does the websocket close. Returns what came before the close message."""
        before: list[dict] = []
        close: dict | None = None
        with trio.fail_after(TIMEOUT):
            try:
                while True:
                    msg = await self.receive()
                    if msg["t"] == "close":
                        close = msg
                    elif close is None:
                        before.append(msg)
            except ConnectionClosed as exc:
                ws_close = exc.reason
        if close_message:
            assert close is not None and close["reason"] == reason, close
            assert (ws_close.code, ws_close.reason) == (1000, reason)
        return before


@asynccontextmanager
async def raw_peer(port, keys=()):
    async with open_websocket(LOCAL, port, "/peer", use_ssl=False) as ws:
        yield RawPeer(ws, keys)


def hello_of(peer: RawPeer, **changes: Any) -> dict:
    hello = cbor2.loads(peer.hs._make_hello())
    hello.update(changes)
    return {k: v for k, v in hello.items() if v is not None}


# --- before the hellos ---------------------------------------------------------------------------
GARBAGE = {
    "garbage-cbor": b"\xff\xfe not cbor",
    "truncated-cbor": cbor2.dumps({"t": "hello", "proto": 1})[:-3],
    "trailing-bytes": cbor2.dumps({"t": "ping"}) + b"\x00",
    "not-a-map": cbor2.dumps(["t", "hello"]),
    "no-type": cbor2.dumps({"proto": 1}),
    "empty": b"",
    "text-message": "hello",
    "box-before-hello": cbor2.dumps({"t": "box", "n": 0, "c": b"\x00" * 32}),
    "ping-before-hello": cbor2.dumps({"t": "ping"}),
    "unknown-type": cbor2.dumps({"t": "sync", "doc": "x", "m": b"\x00\x01\x00"}),
    "hello-without-fields": cbor2.dumps({"t": "hello", "proto": 1, "model": MODEL_VERSION}),
    "hello-bool-version": cbor2.dumps({"t": "hello", "proto": True, "model": 1}),
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
async def test_malformed_first_message_closes_with_protocol_error(devs, nursery, data):
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port) as peer:
        await peer.ws.send_message(data)
        assert await peer.closed_with("protocol-error") == []  # nothing else, not even a hello
    await unaffected(lan)
    assert len(await lan.a.rows()) == 1  # a connection that never said who it is: no row


async def test_hello_with_a_device_id_that_is_not_its_key(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port) as peer:
        other = Identity.generate("other").device_id
        await peer.send(hello_of(peer, device=other))
        assert await peer.closed_with("protocol-error") == []
    await unaffected(lan)


async def test_oversized_message_closes_the_link(devs, nursery):
    """Over the daemon's limit (64 KiB here): the transport closes with 1009 (section 1)."""
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port) as peer:
        await peer.hellos()
        await peer.ws.send_message(cbor2.dumps({"t": "ping", "pad": b"x" * (MAX_MESSAGE + 1)}))
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed) as closed:
            while True:
                await peer.receive()
        assert closed.value.reason.code == 1009
    await unaffected(lan)
    assert await lan.a.row(peer.device) is None  # it never proved its key: no row, no name


# --- after the hellos: boxes ---------------------------------------------------------------------
async def test_box_with_a_skipped_counter_closes_with_protocol_error(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port, [lan.key]) as peer:
        await peer.hellos()
        box = cbor2.loads(peer.auth_box)
        assert box["n"] == 0
        peer.hs.channel.sent = 1  # re-seal the auth as the second box: n = 1, nothing before
        await peer.ws.send_message(peer.seal(peer.hs._auth()))
        assert await peer.closed_with("protocol-error") == []  # a boxed close: no auth, no sync
    await unaffected(lan)
    assert await lan.a.row(peer.device) is None


async def test_tampered_box_closes_with_protocol_error(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port, [lan.key]) as peer:
        await peer.hellos()
        box = cbor2.loads(peer.auth_box)
        box["c"] = bytes([box["c"][0] ^ 1]) + box["c"][1:]
        await peer.send(box)
        assert await peer.closed_with("protocol-error") == []
    await unaffected(lan)
    assert await lan.a.row(peer.device) is None


async def test_message_before_auth_closes_with_protocol_error(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port, [lan.key]) as peer:
        await peer.hellos()
        peer.hs.channel.sent = 0  # the auth box was sealed but never sent: reuse counter 0
        step1 = {"t": "sync", "doc": lan.env, "m": encode_sync(SYNC_STEP1, b"\x00")}
        await peer.ws.send_message(peer.seal(step1))
        assert await peer.closed_with("protocol-error") == []  # no content before auth
    await unaffected(lan)


async def test_replayed_box_and_cleartext_after_boxes_close_the_link(devs, nursery):
    """A member that authenticates, then replays its first box: protocol-error; the same for a
    cleartext message once boxes flow."""
    lan = await lan_of_two(devs, nursery)
    for misbehave in ("replay", "cleartext"):
        async with raw_peer(lan.a.port, [lan.key]) as peer:
            await peer.hellos()
            await peer.authenticate()
            await wait_state(lan.a, peer.device, "connected")
            if misbehave == "replay":
                await peer.ws.send_message(peer.auth_box)
            else:
                await peer.send(hello_of(peer))  # well-formed, but cleartext after boxes
            received = await peer.closed_with("protocol-error")
            # a member did get content (and presence: docs/presence.md)
            assert all(m["t"] in ("sync", "awareness") for m in received)
        row = await wait_state(lan.a, peer.device, "disconnected", "protocol-error")
        assert row["name"] == "raw"
    await unaffected(lan)


async def test_a_bad_update_closes_the_link_and_leaves_the_document_alone(devs, nursery):
    """The auth and the bad update go out back to back: the daemon's reader closes the link while
    its writer is still sending the answer to the auth (regression: the close message, queued
    after the writer took its batch, was never sent; only the websocket close said why)."""
    lan = await lan_of_two(devs, nursery)
    for _ in range(3):
        async with raw_peer(lan.a.port, [lan.key]) as peer:
            await peer.hellos()
            bad = encode_sync(SYNC_UPDATE, b"\x05\xff\xff\xff not a yjs update")
            await peer.ws.send_message(peer.auth_box)
            await peer.ws.send_message(peer.seal({"t": "sync", "doc": lan.env, "m": bad}))
            received = await peer.closed_with("protocol-error")
            assert received[0]["t"] == "auth"
            assert all(m["t"] in ("sync", "awareness") for m in received[1:])
    await unaffected(lan)
    assert (await lan.b.export(lan.env))["routes"][0]["endpoint"] == "still-syncing"


# --- versions and strangers ----------------------------------------------------------------------
@pytest.mark.parametrize("proto, model", [(2, MODEL_VERSION), (1, FIRST_GATED_MODEL - 1)])
async def test_another_version_gets_incompatible_version(devs, nursery, proto, model):
    lan = await lan_of_two(devs, nursery)
    async with raw_peer(lan.a.port) as peer:
        await peer.send(hello_of(peer, proto=proto, model=model))
        await peer.closed_with("incompatible-version")
    # the cleartext close carried the daemon's own versions and identity
    async with raw_peer(lan.a.port) as peer2:
        # a future hello may differ in every other field: only proto and model are read
        await peer2.send({"t": "hello", "proto": proto, "model": model, "whatever": [1, 2]})
        with trio.fail_after(TIMEOUT):
            close = cbor2.loads(await peer2.ws.get_message())
        assert close == {
            "t": "close",
            "reason": "incompatible-version",
            "detail": close["detail"],
            "proto": 1,
            "model": MODEL_VERSION,
            "device": lan.a.device,
            "name": "a",
        }
    await unaffected(lan)
    assert await lan.a.row(peer.device) is None  # an unproven hello changes no row


async def test_a_stranger_gets_unauthorized_and_nothing_else(devs, nursery):
    """A raw dialer with a space the daemon does not hold: the boxed close is the only box."""
    lan = await lan_of_two(devs, nursery)
    elsewhere = SpaceKey("elsewhere", b"\x07" * 32)
    async with raw_peer(lan.a.port, [elsewhere]) as peer:
        await peer.hellos()
        await peer.ws.send_message(peer.auth_box)
        assert await peer.closed_with("unauthorized") == []
        assert peer.hs.channel.received == 1  # exactly one box: the close
    await wait_state(lan.a, peer.device, "disconnected", "unauthorized")
    await unaffected(lan)


async def test_a_daemon_of_another_space_gets_no_content(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    stranger = await devs("stranger").start(nursery, lan.a)
    await make_space(stranger, name="Elsewhere")
    own = await stranger.import_env(new_id=True, name="stranger's own")
    # a never proved its key to the stranger (it refused first): the stranger's row is the
    # address it dialed, without a's device id or name
    row = await wait_address(stranger, lan.a.address, "disconnected", "unauthorized")
    assert (row["device"], row["name"]) == (None, None) and "direction" not in row
    # a verified the stranger's signature before refusing it: a knows who was refused
    row = await wait_state(lan.a, stranger, "disconnected", "unauthorized")
    assert row["name"] == "stranger"
    # the stranger got a's hello, and nothing else: no environment, no space document
    assert await stranger.env_ids() == {own}
    assert await stranger.export(lan.env) is None
    [space] = await stranger.op("space.list")
    assert space["name"] == "Elsewhere" and space["environments"] == []
    assert [m["name"] for m in space["members"]] == ["stranger"]
    assert await lan.a.env_ids() == {lan.env}
    await unaffected(lan)
    assert (await lan.a.row(stranger))["reason"] == "unauthorized"  # still, after retries


# --- hellos that claim someone else ------------------------------------------------------------
class Impersonator(RawPeer):
    """A raw dialer whose hello claims another device: that device's id and public key (both
    public: every hello shows them) and a name of its choosing. It cannot sign for that key."""

    def __init__(self, ws, victim: Dev, name: str = "mallory") -> None:
        super().__init__(ws, name=name)
        victim_key = victim.daemon.identity.public_key
        self.claimed = hello_of(self, device=victim.device, key=victim_key)


async def impersonate(port: int, victim: Dev, misbehave: str) -> None:
    """Dial `port` with a hello claiming `victim`, then fail the handshake as `misbehave` says."""
    async with open_websocket(LOCAL, port, "/peer", use_ssl=False) as ws:
        peer = Impersonator(ws, victim)
        await peer.send(peer.claimed)
        with trio.fail_after(TIMEOUT):
            hello = cbor2.loads(await ws.get_message())
        assert hello["t"] == "hello"  # the daemon took the claim as far as its own hello
        if misbehave == "garbage":
            await ws.send_message(b"\xff\xfe not cbor")
        else:  # an auth box it cannot have made: it does not know the session keys
            await peer.send({"t": "box", "n": 0, "c": b"\x00" * 48})
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()  # the boxed close (keys it cannot derive), then the end
        assert (closed.value.reason.code, closed.value.reason.reason) == (1000, "protocol-error")


@pytest.mark.parametrize("misbehave", ["garbage", "bad-box"])
async def test_a_hello_claiming_an_offline_peer_changes_nothing(devs, nursery, misbehave):
    """The old manager put such a failure (and the stranger's name) on the victim's row."""
    lan = await lan_of_two(devs, nursery)
    await lan.b.stop()
    before = await wait_state(lan.a, lan.b.device, "disconnected", "closed")
    assert before["name"] == "b"
    for _ in range(2):
        await impersonate(lan.a.port, lan.b, misbehave)
    rows = await lan.a.rows()
    assert rows == [before]  # same reason, name, address and since: nothing was attributed
    assert "mallory" not in json.dumps(await lan.a.events())


async def test_a_hello_claiming_a_connected_peer_does_not_rename_it(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    await impersonate(lan.a.port, lan.b, "garbage")
    await unaffected(lan)
    [row] = await lan.a.rows()
    assert (row["device"], row["name"], row["state"]) == (lan.b.device, "b", "connected")


async def test_failed_handshakes_leave_no_rows_named_by_strangers(devs, nursery):
    lan = await lan_of_two(devs, nursery)
    for misbehave in ("garbage", "bad-box"):
        async with raw_peer(lan.a.port) as peer:
            peer.identity.name = "i-chose-this"
            await peer.hellos()
            if misbehave == "garbage":
                await peer.ws.send_message(b"\xff\xfe not cbor")
            else:
                await peer.send({"t": "box", "n": 0, "c": b"\x00" * 48})
            await peer.closed_with("protocol-error")
    await unaffected(lan)
    rows = await lan.a.rows()
    assert [r["device"] for r in rows] == [lan.b.device]
    assert "i-chose-this" not in json.dumps(rows) + json.dumps(await lan.a.events())


# --- a real daemon process announcing protocol version 2 ------------------------------------------
VERSION_2_CHILD = """
import sys
import peerdaemon.peer.handshake as handshake, peerdaemon.peer.messages as messages
import peerdaemon.peer.session as session
messages.PROTOCOL_VERSION = handshake.PROTOCOL_VERSION = session.PROTOCOL_VERSION = 2
from peerdaemon.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_daemon_process_of_protocol_version_2_is_incompatible(daemons):
    port_a, port_b = free_port(), free_port()
    a, b = daemons.new(), daemons.new()
    a.argv += ["--listen", f"{LOCAL}:{port_a}", "--no-mdns", "--name", "current"]
    b.argv = [
        PYTHON,
        "-c",
        VERSION_2_CHILD,
        "run",
        "--data-dir",
        str(b.data_dir),
        "--socket",
        str(b.socket_path),
        "--listen",
        f"{LOCAL}:{port_b}",
        "--no-mdns",
        "--name",
        "future",
        "--peer",
        f"{LOCAL}:{port_a}",
    ]
    a.start()
    b.start()
    address_a = f"{LOCAL}:{port_a}"

    def b_row() -> dict | None:
        with b.client() as c:
            rows = c.call("peers")["peers"]
        return next((r for r in rows if r["address"] == address_a and r["reason"]), None)

    # b dialed a; neither proved its key across the version gap: b's row is the address it
    # dialed (no device id, no name), with both versions; a keeps no row for b's claims
    row_b = until_sync(b_row, what="b's row for a's address", while_down=True)
    assert (row_b["device"], row_b["name"], row_b["state"], row_b["reason"]) == (
        None,
        None,
        "disconnected",
        "incompatible-version",
    )
    assert row_b["versions"] == {
        "local": {"proto": 2, "model": MODEL_VERSION},
        "remote": {"proto": 1, "model": MODEL_VERSION},
    }
    table = pd(b.socket_path, "peers")
    assert (
        f"incompatible-version (ours: proto 2 model {MODEL_VERSION}; theirs: proto 1 model {MODEL_VERSION})"
        in table
    )
    with a.client() as c:
        assert c.call("peers")["peers"] == []
    assert a.stop() == 0 and b.stop() == 0
