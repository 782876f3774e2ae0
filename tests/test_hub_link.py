"""Daemons syncing through a hub (issue 5, daemon side): whole in-process daemons
(`serve(DaemonConfig(..., listen=None, mdns=False))`) attached with `space.hub` to a hub on
127.0.0.1, driven through their local sockets; the hub's accounts are changed the way the admin
commands do it, through a second `Accounts` on the hub's data directory.

Covered: two daemons with no LAN link converge through the hub, edit both ways, and converge
again after the hub restarts (with edits made while it was down); a wrong or revoked token gets
nothing; each limit (environments per space, bytes per environment, devices per user) is hit
and reported in `status` and `peers` with nothing lost and the other environments syncing; a
daemon with an older document model gets `incompatible-version` with the versions the hub
needs; LAN and hub links at once do not loop; the CLI commands; the attachment survives a
restart and never shows the token; nothing the daemon sends to the hub holds the token (only a
proof of it, tests/test_hub_auth.py); a hub whose device key changed is refused with
`hub-key-changed` (nothing syncs) until `space hub ... --token` attaches again.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from daemonutil import InProcessDaemon
from modelutil import load
from peerutil import FakeHost, drain_events, exchange, make_identity, make_space, wire
from trio_websocket import open_websocket

from peerdaemon import cli
from peerdaemon.api.client import ClientError, DaemonError
from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.hub.accounts import Accounts, hash_token
from peerdaemon.hub.peers import HubRequest, PeerEndpoint
from peerdaemon.hub.server import HubConfig, HubServer, serve_hub
from peerdaemon.hublink import HubClientAuth, parse_hub_url
from peerdaemon.identity import Identity
from peerdaemon.model import MODEL_VERSION
from peerdaemon.peer import PROTOCOL_VERSION, PeerConfig, PeerConnection, ProtocolError
from peerdaemon.peer.crypto import SecureChannel
from peerdaemon.peer.session import Closed, DocError, DocRefused
from peerdaemon.spaces.invite import decode_invite

LOCAL = "127.0.0.1"
ENV_FILE = "test-env.json"
FAST = PeerConfig(backoff_initial=0.05, backoff_max=0.3, connect_timeout=2.0, close_grace=0.5)
TIMEOUT = 10.0


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdhub"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the hub --------------------------------------------------------------------------------------
class Hub:
    """The real hub server (`serve_hub`) in this process, with its `/peer` endpoint; restartable
    on the same port and data directory."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "hub"
        self.port: int | None = None
        self.server: HubServer | None = None
        self.identity: Identity | None = None
        """The hub's device key (None: the one kept in its store)."""
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        return f"ws://{LOCAL}:{self.port}"

    async def start(self, nursery: trio.Nursery) -> Hub:
        config = HubConfig(
            self.dir,
            listen=(LOCAL, self.port or 0),
            accounts_poll=0.05,
            peer_endpoint=lambda docs, accounts, events: PeerEndpoint(
                docs, accounts, events, config=FAST, identity=self.identity
            ),
        )
        self.server = await nursery.start(self._run, config)
        self.port = self.server.port
        return self

    async def _run(self, config: HubConfig, task_status: trio.TaskStatus[HubServer]) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                await serve_hub(config, task_status=task_status)
        finally:
            self.server = None
            self._stopped.set()

    async def stop(self) -> None:
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    def stored(self, space: str) -> list[str]:
        assert self.server is not None
        return self.server.docs.doc_ids(space)


# --- daemons --------------------------------------------------------------------------------------
class Dev(InProcessDaemon):
    """One whole daemon in this process (no LAN listener, no mDNS), with a socket client."""

    def __init__(self, base: Path, name: str) -> None:
        super().__init__(base, name)
        self.listen: tuple[str, int] | None = None
        self.peers: list[tuple[str, int]] = []

    async def start(self, nursery: trio.Nursery) -> Dev:
        config = DaemonConfig(
            self.data_dir,
            self.socket_path,
            name=self.name,
            listen=self.listen,
            peers=list(self.peers),
            mdns=False,
            peer_config=FAST,
        )
        await self.start_with(nursery, config)
        return self

    async def import_env(self, name: str = "Test env", *, new_id: bool = True) -> str:
        env = load(ENV_FILE)
        env["name"] = name
        return (await self.client.import_env(env, new_id=new_id))["id"]

    async def get(self, env_id: str, pointer: str = "") -> Any:
        try:
            return await self.client.call("env.get", id=env_id, pointer=pointer)
        except DaemonError as exc:
            if exc.code == "not-found":
                return None
            raise

    async def set_name(self, env_id: str, value: str) -> None:
        await self.op(
            "env.patch", id=env_id, patch=[{"op": "replace", "path": "/name", "value": value}]
        )

    async def hub(self, url: str | None = None) -> dict[str, Any]:
        hubs = (await self.op("status"))["hub"]
        return next(h for h in hubs if url is None or h["url"] == url)

    async def hub_row(self) -> dict[str, Any]:
        rows = (await self.op("peers"))["peers"]
        return next(r for r in rows if r.get("kind") == "hub")


async def wait_until(pred: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT) -> Any:
    with trio.fail_after(timeout):
        while True:
            value = await pred()
            if value:
                return value
            await trio.sleep(0.02)


async def hub_state(dev: Dev, state: str, reason: str | None = None) -> dict[str, Any]:
    async def check() -> Any:
        h = await dev.hub()
        return h if h["state"] == state and (reason is None or h["reason"] == reason) else None

    return await wait_until(check)


async def same_env(a: Dev, b: Dev, env_id: str) -> bool:
    x, y = await a.get(env_id), await b.get(env_id)
    return x is not None and x == y


async def hub_row_state(dev: Dev, state: str, reason: str | None) -> dict[str, Any]:
    """Wait until `peers` shows the hub in `state` for `reason` (a refused link is redialed, and
    reads `connecting` during each attempt)."""

    async def check() -> Any:
        row = await dev.hub_row()
        return row if (row["state"], row["reason"]) == (state, reason) else None

    return await wait_until(check)


async def hub_holds(hub: Hub, space: str, dev: Dev, env_id: str) -> None:
    """Wait until the hub has stored all that `dev` holds of `env_id` (compared by state vector,
    so a test that stops the hub next does not race the upload)."""

    async def check() -> bool:
        if hub.server is None or env_id not in hub.stored(space):
            return False
        mine = dev.daemon.registry.get(env_id).doc.get_state()
        return hub.server.docs.state_vector(space, env_id) == mine

    await wait_until(check)


async def team(a: Dev, hub: Hub, token: str, envs: int = 1) -> tuple[str, list[str]]:
    """A space on `a` with `envs` shared environments, attached to the hub."""
    space = (await a.op("space.create", name="Team"))["id"]
    ids = []
    for i in range(envs):
        env_id = await a.import_env(f"env {i}")
        await a.op("env.share", id=env_id, space=space)
        ids.append(env_id)
    result = await a.op("space.hub", space=space, url=hub.url, token=token)
    assert result == {"space": space, "url": hub.url}
    return space, ids


async def join(b: Dev, a: Dev, space: str, token: str) -> None:
    code = (await a.op("space.invite", space=space, addresses=[]))["code"]
    assert decode_invite(code).hub == (await a.hub())["url"]  # the invite carries the hub
    await b.op("space.join", code=code)
    await b.op("space.hub", space=space, token=token)  # the URL comes from the invite


# --- tests ----------------------------------------------------------------------------------------
def test_hub_urls():
    assert parse_hub_url("ws://127.0.0.1:8080").url == "ws://127.0.0.1:8080"
    assert parse_hub_url("http://h:81/peer").path == "/peer"
    u = parse_hub_url("https://hub.example/team/")
    assert (u.url, u.port, u.path, u.tls) == ("wss://hub.example:443/team", 443, "/team/peer", True)
    assert parse_hub_url("ws://[::1]:9").url == "ws://[::1]:9"
    for bad in ("", "ftp://h", "ws://", "ws://h:99999", "ws://u:p@h:1", "ws://h:1/?x=1"):
        with pytest.raises(ValueError):
            parse_hub_url(bad)


class RefusingHost(FakeHost):
    """A hub-side host that refuses the updates of some documents, like HubDocs' limits."""

    def __init__(self, *spaces: Any) -> None:
        super().__init__(spaces)
        self.refuse: set[str] = set()

    def apply(self, doc_id: str, update: bytes, origin: str) -> None:
        if doc_id in self.refuse:
            raise DocRefused("quota-exceeded", f"{doc_id}: the space is full")
        super().apply(doc_id, update, origin)


class HubSide:
    """A hub-side `AuthPolicy` that accepts (a proof of) token "t" for the given spaces."""

    def __init__(self, *spaces: str) -> None:
        self.accepted = frozenset(spaces)

    def auth_fields(self, peer: Any, th: bytes, role: bytes) -> dict[str, Any]:
        return {"tags": [], "hub": {"user": "u", "spaces": dict.fromkeys(self.accepted, "ok")}}

    def accept(self, peer: Any, auth: dict[str, Any], th: bytes, role: bytes) -> frozenset[str]:
        if not HubRequest.parse(auth).verify(hash_token("t"), th, role):
            raise ProtocolError("unauthorized", "bad token")
        return self.accepted

    def spaces(self) -> frozenset[str]:
        return self.accepted


def test_hub_mode_session_refuses_one_doc_and_keeps_the_others_syncing():
    s1 = make_space("s1")
    daemon, hub = make_identity("daemon"), make_identity("hub")
    dh, hh = FakeHost([s1]), RefusingHost(s1)
    dh.add_doc("env1", ["s1"], {"a": 1})
    dh.add_doc("env2", ["s1"], {"b": 2})
    hh.share("env1", "s1")
    hh.share("env2", "s1")
    hh.refuse.add("env2")
    d = PeerConnection(
        daemon,
        dh,
        dialer=True,
        now=0.0,
        auth=HubClientAuth("t", {"s1": "Team"}),
        origin="hub:ws://hub:1",
    )
    h = PeerConnection(hub, hh, dialer=False, now=0.0, auth=HubSide("s1"))
    wire(dh, lambda: [d])
    wire(hh, lambda: [h])
    exchange(d, h)
    assert d.state == h.state == "open" and d.spaces == h.spaces == {"s1"}
    assert DocError("env2", "quota-exceeded", "env2: the space is full") in drain_events(d)
    assert hh.values("env1") == {"a": 1} and hh.values("env2") == {}
    assert set(d.session.refused) == {"env2"}

    dh.edit("env2", {"b": 3})  # not offered again on this link...
    assert d.data_to_send() == []
    dh.edit("env1", {"a": 5})  # ...while the other documents keep syncing
    hh.edit("env1", {"c": 7})
    exchange(d, h)
    assert hh.values("env1") == dh.values("env1") == {"a": 5, "c": 7}
    hh.refuse.clear()  # room made; the daemon's documents change: the refused one is retried
    dh.add_doc("env3", ["s1"], {"x": 1})
    exchange(d, h)
    assert hh.values("env2") == {"b": 3} and not d.session.refused
    assert {o for _, _, o in hh.applied} == {f"peer:{daemon.device_id}"}
    assert {o for _, _, o in dh.applied} == {"hub:ws://hub:1"}


def test_hub_mode_auths_and_lan_peers_do_not_mix():
    s1 = make_space("s1")
    daemon, hub, lan = make_identity("daemon"), make_identity("hub"), make_identity("lan")

    def pair(d_auth: Any, h_auth: Any, h_ident: Any = hub) -> tuple[Any, Any]:
        d = PeerConnection(daemon, FakeHost([s1]), dialer=True, now=0.0, auth=d_auth)
        h = PeerConnection(h_ident, FakeHost([s1]), dialer=False, now=0.0, auth=h_auth)
        exchange(d, h)
        return drain_events(d), drain_events(h)

    def closed(events: list[Any]) -> Closed:
        return next(e for e in events if isinstance(e, Closed))

    _, ev_h = pair(HubClientAuth("wrong", {"s1": ""}), HubSide("s1"))
    assert closed(ev_h).reason == "unauthorized"
    ev_d, _ = pair(HubClientAuth("t", {"s1": ""}), None, lan)  # a LAN daemon at the hub's URL
    assert closed(ev_d).reason == "unauthorized"
    _, ev_h = pair(None, HubSide("s1"))  # a LAN-mode auth at a hub
    assert closed(ev_h).reason == "unauthorized"


async def test_two_daemons_converge_through_the_hub_and_after_it_restarts(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    alice, bob = admin.add_user("alice"), admin.add_user("bob")
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)

    space, [env] = await team(a, hub, alice)
    connected = await hub_state(a, "connected")
    assert connected["spaces"] == {space: "registered"} and connected["user"] == "alice"
    assert admin.space(space)["owner"] == "alice"  # the first attach registered it
    await wait_until(lambda: _async(env in hub.stored(space)))

    await join(b, a, space, bob)  # bob is no member yet: the hub refuses the space
    refused = await hub_state(b, "disconnected", "forbidden")
    assert refused["spaces"] == {space: "forbidden"}
    assert await b.get(env) is None
    admin.add_member(space, "bob")  # `peerdaemon hub space add-member SPACE bob`
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))

    # no LAN link: the hub is the only peer either daemon has
    for dev in (a, b):
        rows = (await dev.op("peers"))["peers"]
        assert [(r["kind"], r["address"], r["state"]) for r in rows] == [
            ("hub", hub.url, "connected")
        ]

    # edits both ways; the hub's updates carry the origin hub:<url>
    cursor = (await b.op("status"))["events"]
    await a.set_name(env, "from a")
    await wait_until(lambda: _eq(b.get(env, "/name"), "from a"))
    events = (await b.op("events.subscribe", since=cursor))["events"]
    changed = [e for e in events if e["type"] == "environment-changed"]
    assert changed and changed[-1]["data"]["origin"] == f"hub:{hub.url}"
    await b.set_name(env, "from b")
    await wait_until(lambda: _eq(a.get(env, "/name"), "from b"))
    env2 = await b.import_env("made on b")
    await b.op("env.share", id=env2, space=space)
    await wait_until(lambda: same_env(a, b, env2))

    # the hub restarts; edits made meanwhile on both sides converge once it is back
    hub_device = (await a.hub())["device"]
    await hub.stop()
    await hub_state(a, "disconnected")
    await a.set_name(env, "offline a")
    await b.op("env.patch", id=env2, patch=[{"op": "replace", "path": "/port", "value": 4321}])
    await hub.start(nursery)
    assert (await hub_state(a, "connected"))["device"] == hub_device  # the hub kept its key
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))
    await wait_until(lambda: same_env(a, b, env2))
    assert await a.get(env2, "/port") == 4321 and await b.get(env, "/name") == "offline a"
    admin.close()


async def test_a_wrong_or_revoked_token_gets_nothing(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    good = admin.add_user("alice")
    spare = admin.add_token("alice")
    admin.revoke_token(spare)
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    space, [env] = await team(a, hub, good)
    await hub_state(a, "connected")
    await wait_until(lambda: _async(env in hub.stored(space)))

    # b holds the space (an invite) but a wrong token: it gets nothing, not even the space doc
    await join(b, a, space, "not-a-token")
    state = await hub_state(b, "disconnected", "unauthorized")
    assert state["user"] is None and state["errors"] == []
    await hub_row_state(b, "disconnected", "unauthorized")
    await b.op("space.hub", space=space, token=spare)  # revoked
    await trio.sleep(0.3)
    await hub_state(b, "disconnected", "unauthorized")
    assert await b.get(env) is None
    [listed] = await b.op("space.list")
    assert [m["name"] for m in listed["members"]] == ["b"]  # a's space document never came

    # a wrong token registers nothing either
    own = (await b.op("space.create", name="Mine"))["id"]
    await b.op("space.hub", space=own, url=hub.url, token="still-wrong")
    await trio.sleep(0.3)
    assert admin.space(own) is None and hub.stored(own) == []

    # a token revoked while connected ends the link
    admin.revoke_token(good)
    await hub_state(a, "disconnected", "unauthorized")
    admin.close()


async def test_each_limit_is_reported_and_nothing_is_lost(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token1, token2 = admin.add_user("alice"), admin.add_token("alice")
    token3 = admin.add_token("alice")
    admin.set_limit("envs_per_space", 2, user="alice")
    admin.set_limit("bytes_per_env", 64_000, user="alice")
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    c = await Dev(base, "c").start(nursery)
    events_a = (await a.op("status"))["events"]

    # environments per space: the third is refused, the others sync, a keeps all three
    space, envs = await team(a, hub, token1, envs=3)
    await join(b, a, space, token2)

    async def quota() -> Any:
        h = await a.hub()
        return h if h["state"] == "connected" and h["errors"] else None

    status = await wait_until(quota)
    [error] = status["errors"]
    assert error["reason"] == "quota-exceeded" and error["space"] == space
    assert "limit 2" in error["detail"]
    refused = error["doc"]
    kept = [e for e in envs if e != refused]
    assert status["reason"] == "quota-exceeded"
    row = await hub_row_state(a, "connected", "quota-exceeded")
    assert refused in row["detail"]
    for env_id in kept:
        await wait_until(lambda env_id=env_id: same_env(a, b, env_id))
    assert await b.get(refused) is None and await a.get(refused) is not None
    events = (await a.op("events.subscribe", since=events_a))["events"]
    limits = [e["data"] for e in events if e["type"] == "hub-limit"]
    assert limits and limits[0]["doc"] == refused and limits[0]["reason"] == "quota-exceeded"

    # the admin raises the limit: the refused environment is offered again and gets through
    admin.set_limit("envs_per_space", 3, user="alice")
    await wait_until(lambda: same_env(a, b, refused))
    await wait_until(lambda: _async(not _errors_of(a)))

    # bytes per environment: a big edit is refused; the hub and b keep the last version that fit,
    # a keeps its own, and the other environment keeps syncing
    big, other = kept
    await a.op(
        "env.patch", id=big, patch=[{"op": "replace", "path": "/name", "value": "x" * 100_000}]
    )

    async def too_large() -> Any:
        h = await a.hub()
        return any(e["doc"] == big and e["reason"] == "environment-too-large" for e in h["errors"])

    await wait_until(too_large)
    assert (await b.get(big, "/name")).startswith("env ")
    assert len(await a.get(big, "/name")) == 100_000
    assert sorted(hub.stored(space)) == sorted([f"space:{space}", *envs])
    await a.set_name(other, "still syncing")
    await wait_until(lambda: _eq(b.get(other, "/name"), "still syncing"))
    await b.set_name(other, "both ways")
    await wait_until(lambda: _eq(a.get(other, "/name"), "both ways"))

    # devices per user (2): alice's third device is refused, the first two keep syncing
    await join(c, a, space, token3)
    state = await hub_state(c, "disconnected", "too-many-devices")
    assert "limit 2" in state["detail"]
    await hub_row_state(c, "disconnected", "too-many-devices")
    assert await c.get(other) is None
    await a.set_name(other, "two devices")
    await wait_until(lambda: _eq(b.get(other, "/name"), "two devices"))
    # when one of them goes, the third gets its turn
    await b.stop()
    await hub_state(c, "connected")
    await wait_until(lambda: same_env(a, c, other))
    admin.close()


async def test_a_space_granted_later_syncs_on_the_live_link(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    alice, bob = admin.add_user("alice"), admin.add_user("bob")
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    open_space, [env1] = await team(a, hub, alice)
    closed_space = (await a.op("space.create", name="Closed"))["id"]
    env2 = await a.import_env("closed env")
    await a.op("env.share", id=env2, space=closed_space)
    await a.op("space.hub", space=closed_space, token=alice, url=hub.url)
    await wait_until(lambda: _async(env2 in hub.stored(closed_space)))
    admin.add_member(open_space, "bob")
    await join(b, a, open_space, bob)
    await join(b, a, closed_space, bob)

    async def partly() -> Any:
        h = await b.hub()
        return h if h["state"] == "connected" and h["reason"] == "forbidden" else None

    state = await wait_until(partly)
    assert state["spaces"] == {open_space: "ok", closed_space: "forbidden"}
    await wait_until(lambda: same_env(a, b, env1))
    assert await b.get(env2) is None
    admin.add_member(closed_space, "bob")  # the hub notices and lets b redial for it
    await wait_until(lambda: same_env(a, b, env2))
    state = await hub_state(b, "connected", None)
    assert state["spaces"] == {open_space: "ok", closed_space: "ok"}
    admin.close()


async def test_an_older_daemon_gets_incompatible_version(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    a.daemon.hubs.model = MODEL_VERSION - 1  # a daemon whose document model is older
    space, _ = await team(a, hub, token)
    state = await hub_state(a, "disconnected", "incompatible-version")
    assert state["versions"]["remote"] == {"proto": PROTOCOL_VERSION, "model": MODEL_VERSION}
    assert f"the hub needs protocol {PROTOCOL_VERSION} model {MODEL_VERSION}" in state["detail"]
    assert "upgrade peerdaemon" in state["detail"]
    row = await hub_row_state(a, "disconnected", "incompatible-version")
    assert row["versions"] == state["versions"]
    assert admin.space(space) is None

    # and an older protocol: the hub answers with the versions it needs, in cleartext
    async with open_websocket(LOCAL, hub.port, "/peer", use_ssl=False) as ws:
        await ws.send_message(cbor2.dumps({"t": "hello", "proto": 0, "model": MODEL_VERSION}))
        close = cbor2.loads(await ws.get_message())
    assert close["t"] == "close" and close["reason"] == "incompatible-version"
    assert (close["proto"], close["model"]) == (PROTOCOL_VERSION, MODEL_VERSION)
    admin.close()


async def test_lan_and_hub_at_once_converge_without_looping(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token1, token2 = admin.add_user("alice"), admin.add_token("alice")
    a, b = Dev(base, "a"), Dev(base, "b")
    a.listen = b.listen = (LOCAL, 0)
    await a.start(nursery)
    b.peers = [(LOCAL, a.daemon.peer_port)]
    await b.start(nursery)
    space, [env] = await team(a, hub, token1)
    await join(b, a, space, token2)
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))

    async def lan_up() -> bool:
        rows = (await a.op("peers"))["peers"]
        return any(r.get("kind") != "hub" and r["state"] == "connected" for r in rows)

    await wait_until(lan_up)
    for i in range(5):
        await a.set_name(env, f"a{i}")
        await b.op(
            "env.patch", id=env, patch=[{"op": "replace", "path": "/port", "value": 5000 + i}]
        )
    await wait_until(lambda: same_env(a, b, env))
    await trio.sleep(0.5)

    def traffic() -> tuple[int, ...]:
        links = [h.link for d in (a, b) for h in d.daemon.hubs.links.values()]
        return tuple(
            getattr(lk, "messages_sent", 0) + getattr(lk, "messages_received", 0)
            for lk in links
            if lk
        )

    before = traffic()
    assert len(before) == 2 and all(before)
    await trio.sleep(1.0)  # a loop would keep both paths busy
    assert traffic() == before
    assert await a.get(env, "/name") == "a4" and await a.get(env, "/port") == 5004
    admin.close()


async def test_cli_attach_detach_status_and_restart(base, nursery, capsys, monkeypatch):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    sock = ["--socket", str(a.socket_path)]
    space = (await a.op("space.create", name="Team"))["id"]

    async def run(*argv: str) -> int:
        return await trio.to_thread.run_sync(cli.main, [*sock, *argv])

    assert await run("space", "hub", "Team", "ftp://nope", "--token", token) == 1
    assert "ws://" in capsys.readouterr().err
    assert await run("space", "hub", "Team", "--token", token) == 1  # no URL known yet
    assert "URL" in capsys.readouterr().err
    assert await run("space", "hub", "Team", f"http://{LOCAL}:{hub.port}/", "--token", token) == 0
    await hub_state(a, "connected")
    assert await run("status") == 0
    out = capsys.readouterr().out
    assert f'"url": "{hub.url}"' in out and token not in out
    assert await run("peers") == 0
    out = capsys.readouterr().out
    assert hub.url in out and "connected" in out and token not in out
    assert await run("status", "--json") == 0
    [entry] = json.loads(capsys.readouterr().out)["hub"]
    assert entry["spaces"] == {space: "registered"} and token not in json.dumps(entry)

    # the attachment survives a restart (the token stays in the data dir only)
    await a.stop()
    await a.start(nursery)
    await hub_state(a, "connected")
    await a.op("space.unhub", space=space)
    assert (await a.op("status"))["hub"] == []
    with pytest.raises(ClientError):
        await a.op("space.unhub", space=space)
    assert await run("space", "unhub", "Team") == 1
    assert "not attached" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))  # --token -: from stdin
    assert await run("space", "hub", space, hub.url, "--token", "-") == 0
    await hub_state(a, "connected")
    admin.close()


async def test_the_token_never_reaches_the_hub(base, nursery, monkeypatch):
    """Everything the daemon sends to the hub (hellos, and every box's plaintext) is captured:
    the token, its hash, and its listed prefix never appear; the hub still admits the daemon."""
    sent: list[bytes] = []
    seal = SecureChannel.seal

    def recording_seal(channel: SecureChannel, inner: dict[str, Any]) -> bytes:
        if getattr(channel, "_test_dialer", False):
            sent.append(cbor2.dumps(inner))
        return seal(channel, inner)

    init = SecureChannel.__init__

    def recording_init(channel: SecureChannel, keys: Any, *, dialer: bool) -> None:
        init(channel, keys, dialer=dialer)
        channel._test_dialer = dialer  # type: ignore[attr-defined]

    send = PeerConnection.data_to_send

    def recording_send(conn: PeerConnection) -> list[bytes]:
        data = send(conn)
        if conn.dialer:
            sent.extend(data)
        return data

    monkeypatch.setattr(SecureChannel, "seal", recording_seal)
    monkeypatch.setattr(SecureChannel, "__init__", recording_init)
    monkeypatch.setattr(PeerConnection, "data_to_send", recording_send)

    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    space, [env] = await team(a, hub, token)
    await hub_state(a, "connected")
    await wait_until(lambda: _async(env in hub.stored(space)))
    await a.set_name(env, "after connecting")
    await trio.sleep(0.2)
    assert admin.space(space)["owner"] == "alice"
    auths = [m for m in map(cbor2.loads, sent) if m.get("t") == "auth"]
    assert auths and all(
        set(m["hub"]) == {"token_id", "proof", "spaces", "register"} for m in auths
    )
    digest = bytes.fromhex(hash_token(token))
    for data in sent:
        for secret in (token.encode(), digest, digest.hex().encode(), token[:8].encode()):
            assert secret not in data
    admin.close()


async def test_a_changed_hub_key_is_refused_until_attached_again(base, nursery):
    hub = await Hub(base).start(nursery)
    admin = Accounts.open(hub.dir)
    token1, token2 = admin.add_user("alice"), admin.add_token("alice")
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    space, [env] = await team(a, hub, token1)
    first = (await hub_state(a, "connected"))["device"]
    assert a.daemon.hubs.attached[hub.url]["device"] == first  # pinned on first use
    await hub_holds(hub, space, a, env)  # b will read it from the hub's store

    # the pin survives a restart of the daemon (it is stored with the attachment)
    await a.stop()
    await a.start(nursery)
    assert a.daemon.hubs.attached[hub.url]["device"] == first
    await hub_state(a, "connected")

    # the hub comes back with another key (or something else answers at its URL)
    await hub.stop()
    hub.identity = Identity.generate("impostor")
    await hub.start(nursery)
    state = await hub_state(a, "disconnected", "hub-key-changed")
    assert first in state["detail"] and hub.identity.device_id in state["detail"]
    assert "space hub" in state["detail"]
    await hub_row_state(a, "disconnected", "hub-key-changed")
    assert a.daemon.hubs.attached[hub.url]["device"] == first  # the pin is kept

    # nothing syncs through it: b (attached after the change, so it trusts the new key) does
    # not get a's edits, and the hub never admits a
    await join(b, a, space, token2)
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))  # what the hub stored before the change
    await a.set_name(env, "not through an unknown hub")
    await trio.sleep(0.5)
    assert await b.get(env, "/name") != "not through an unknown hub"
    assert (await a.hub())["reason"] == "hub-key-changed"
    assert [d["device"] for d in hub.server.peer_endpoint.daemons()] == [
        b.daemon.identity.device_id
    ]

    # attaching again (`space hub ... --token`) trusts the key the hub shows next
    await a.op("space.hub", space=space, url=hub.url, token=token1)
    await hub_state(a, "connected")
    assert a.daemon.hubs.attached[hub.url]["device"] == hub.identity.device_id
    await wait_until(lambda: _eq(b.get(env, "/name"), "not through an unknown hub"))
    admin.close()


# --- small helpers --------------------------------------------------------------------------------
async def _async(value: Any) -> Any:
    return value


def _errors_of(dev: Dev) -> list[Any]:
    return [e for h in dev.daemon.hubs.links.values() for e in h.live_errors()]


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected
