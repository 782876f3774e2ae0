"""Daemons syncing through a hub (the daemon side): whole in-process daemons
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
`hub-key-changed` (nothing syncs) until `space hub ... --hub-key NEW` attaches again; an impostor
at the hub's URL receives nothing but the daemon's hello when the daemon knows the hub's key
(given, or from the invite) or may not trust a first key, and `--trust-first-use` pins the first
key over ws://; `space hub` waits for the hub's answer and reports it.

Each test that starts a hub runs twice (the `hubs` fixture): `[embedded]`, the single-process
hub on its SQLite store, and `[cluster]`, hub processes of a cluster (scaled mode, issue 14) on
a private Redis and PostgreSQL (tests/clusterhub.py), whose accounts the admin changes in
PostgreSQL. A hub that restarts there is a new process of the same cluster; the third device
of the limits test dials a second process, so the cluster's device slots refuse it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import cbor2
import pytest
import trio
from clusterhub import Cluster, ClusterAdmin, ClusterServers, cluster_servers  # noqa: F401
from daemonutil import InProcessDaemon
from helpers import until as wait_until
from modelutil import load
from peerutil import (
    FakeHost,
    MemoryConnection,
    drain_events,
    exchange,
    make_identity,
    make_space,
    wire,
)
from trio_websocket import open_websocket

from peerdaemon import cli
from peerdaemon.api.client import ClientError, DaemonError
from peerdaemon.core.identity import Identity
from peerdaemon.daemon.supervisor import DaemonConfig
from peerdaemon.hub.accounts import Accounts, hash_token
from peerdaemon.hub.peers import HubRequest, PeerEndpoint
from peerdaemon.hub.server import HubConfig, HubServer, serve_hub
from peerdaemon.hublink import HUB_KEY_UNKNOWN, HubClientAuth, normalize_hub_key, parse_hub_url
from peerdaemon.model import MODEL_VERSION
from peerdaemon.peer import (
    PROTOCOL_VERSION,
    Closed,
    DocError,
    DocRefused,
    PeerConfig,
    PeerConnection,
    PeerProtocolError,
)
from peerdaemon.peer.crypto import SecureChannel
from peerdaemon.spaces.invite import Invite, decode_invite, encode_invite

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
    on the same port and data directory. With `cluster`, one process of that cluster (scaled
    mode: documents and accounts in its PostgreSQL, rooms over its Redis)."""

    running: ClassVar[set[Hub]] = set()
    """Hubs started and not stopped (a cluster's admin has them read its changes)."""

    def __init__(self, base: Path, name: str = "hub", cluster: Cluster | None = None) -> None:
        self.dir = base / name
        self.cluster = cluster
        self.port: int | None = None
        self.server: HubServer | None = None
        self.identity: Identity | None = None
        """The hub's device key (None: the one kept in its store)."""
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        return f"ws://{LOCAL}:{self.port}"

    @property
    def key(self) -> str:
        """The key fingerprint the hub shows (its device id), as `hub status` prints it."""
        assert self.server is not None
        return self.server.peer_endpoint.identity.device_id

    async def start(self, nursery: trio.Nursery) -> Hub:
        config = HubConfig(
            self.dir,
            listen=(LOCAL, self.port or 0),
            accounts_poll=0.05,
            peer_endpoint=lambda docs, accounts, events: PeerEndpoint(
                docs, accounts, events, config=FAST, identity=self.identity
            ),
            redis=self.cluster.redis_url if self.cluster else None,
            postgres=self.cluster.dsn if self.cluster else None,
        )
        self.server = await nursery.start(self._run, config)
        self.port = self.server.port
        Hub.running.add(self)
        return self

    async def _run(self, config: HubConfig, task_status: trio.TaskStatus[HubServer]) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                await serve_hub(config, task_status=task_status)
        finally:
            self.server = None
            Hub.running.discard(self)
            self._stopped.set()

    async def stop(self) -> None:
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    def stored(self, space: str) -> list[str]:
        assert self.server is not None
        return self.server.docs.doc_ids(space)

    def admin(self) -> Accounts:
        """The hub's accounts as the admin commands change them (the hub picks changes up by
        its poll): its data directory's file, or the cluster's PostgreSQL."""
        if self.cluster is None:
            return Accounts.open(self.dir)
        cluster = self.cluster

        def caught_up() -> None:  # every running process of this cluster reads the change
            for hub in Hub.running:
                if hub.cluster is cluster and hub.server is not None:
                    hub.server.accounts.refresh()

        return ClusterAdmin(cluster.dsn, caught_up)  # type: ignore[return-value]  # a proxy of ClusterAccounts


class Hubs:
    """The test's hubs in its mode (`hubs` fixture): embedded, or processes of one cluster."""

    def __init__(self, base: Path, cluster: Cluster | None) -> None:
        self.base = base
        self.cluster = cluster

    def new(self, name: str = "hub") -> Hub:
        return Hub(self.base, name, self.cluster)


@pytest.fixture(params=["embedded", "cluster"])
def hubs(request: pytest.FixtureRequest, base: Path) -> Hubs:
    """Each test that starts a hub runs on the embedded hub and on a cluster (issue 14); the
    cluster's servers are the module's (clusterhub.py), its schema and Redis index the test's."""
    if request.param == "embedded":
        return Hubs(base, None)
    servers: ClusterServers = request.getfixturevalue("cluster_servers")
    return Hubs(base, servers.fresh())


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


async def hub_state(dev: Dev, state: str, reason: str | None = None) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    async def check() -> Any:
        h = await dev.hub()
        seen[:] = [h]
        return h if h["state"] == state and (reason is None or h["reason"] == reason) else None

    try:
        return await wait_until(check)
    except AssertionError as exc:  # say where the link was, not just "None"
        raise AssertionError(
            f"{exc}; wanted {state}/{reason}, the link's last row: {seen}"
        ) from None


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
    """A space on `a` with `envs` shared environments, attached to the hub (by its key: the
    hub is on ws://, which does not authenticate it)."""
    space = (await a.op("space.create", name="Team"))["id"]
    ids = []
    for i in range(envs):
        env_id = await a.import_env(f"env {i}")
        await a.op("env.share", id=env_id, space=space)
        ids.append(env_id)
    result = await a.op("space.hub", space=space, url=hub.url, token=token, hub_key=hub.key)
    assert result == {"space": space, "url": hub.url}
    return space, ids


async def join(b: Dev, a: Dev, space: str, token: str, **hub_args: Any) -> None:
    code = (await a.op("space.invite", space=space, addresses=[]))["code"]
    invite = decode_invite(code)
    assert invite.hub == (await a.hub())["url"]  # the invite carries the hub...
    assert invite.hub_key == a.daemon.hubs.pinned(invite.hub)  # ...and the key a trusts
    await b.op("space.join", code=code)
    # the URL and the hub's key come from the invite
    await b.op("space.hub", space=space, token=token, **hub_args)


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
            raise PeerProtocolError("unauthorized", "bad token")
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
    d = MemoryConnection(
        daemon,
        dh,
        dialer=True,
        now=0.0,
        auth=HubClientAuth("t", {"s1": "Team"}, trust_first_use=True),
        origin="hub:ws://hub:1",
    )
    h = MemoryConnection(hub, hh, dialer=False, now=0.0, auth=HubSide("s1"))
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
        d = MemoryConnection(daemon, FakeHost([s1]), dialer=True, now=0.0, auth=d_auth)
        h = MemoryConnection(h_ident, FakeHost([s1]), dialer=False, now=0.0, auth=h_auth)
        exchange(d, h)
        return drain_events(d), drain_events(h)

    def closed(events: list[Any]) -> Closed:
        return next(e for e in events if isinstance(e, Closed))

    _, ev_h = pair(HubClientAuth("wrong", {"s1": ""}, trust_first_use=True), HubSide("s1"))
    assert closed(ev_h).reason == "unauthorized"
    ev_d, _ = pair(HubClientAuth("t", {"s1": ""}, lan.device_id), None, lan)  # a LAN daemon
    assert closed(ev_d).reason == "unauthorized"
    _, ev_h = pair(None, HubSide("s1"))  # a LAN-mode auth at a hub
    assert closed(ev_h).reason == "unauthorized"


async def test_two_daemons_converge_through_the_hub_and_after_it_restarts(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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


async def test_a_wrong_or_revoked_token_gets_nothing(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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
    # revoked: wait for the hub's answer to an attempt with that token (not a fixed sleep)
    answer = await b.op("space.hub", space=space, token=spare, wait=TIMEOUT)
    assert (answer["outcome"], answer["reason"]) == ("refused", "unauthorized")
    await hub_state(b, "disconnected", "unauthorized")
    assert await b.get(env) is None
    [listed] = await b.op("space.list")
    assert [m["name"] for m in listed["members"]] == ["b"]  # a's space document never came

    # a wrong token registers nothing either
    own = (await b.op("space.create", name="Mine"))["id"]
    answer = await b.op(
        "space.hub", space=own, url=hub.url, token="still-wrong", hub_key=hub.key, wait=TIMEOUT
    )
    assert (answer["outcome"], answer["reason"]) == ("refused", "unauthorized")  # answered
    assert admin.space(own) is None and hub.stored(own) == []

    # a token revoked while connected ends the link
    admin.revoke_token(good)
    await hub_state(a, "disconnected", "unauthorized")
    admin.close()


async def test_each_limit_is_reported_and_nothing_is_lost(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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

    # devices per user (2): alice's third device is refused, the first two keep syncing (on a
    # cluster, the third dials another process: the cluster's device slots refuse it)
    elsewhere = {}
    if hubs.cluster is not None:
        two = await hubs.new("hub2").start(nursery)
        elsewhere = {"url": two.url, "hub_key": two.key}
    await join(c, a, space, token3, **elsewhere)
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


async def test_a_space_granted_later_syncs_on_the_live_link(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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


async def test_an_older_daemon_gets_incompatible_version(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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


async def test_lan_and_hub_at_once_converge_without_looping(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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

    def traffic() -> int:
        links = [h.link for d in (a, b) for h in d.daemon.hubs.dialers.values()]
        assert len(links) == 2 and all(links)
        return sum(lk.messages_sent + lk.messages_received for lk in links)

    async def barrier(n: int) -> None:
        """One edit each way, each awaited on the other side: whatever was in flight before
        has arrived (links are ordered) by then."""
        await a.set_name(env, f"barrier{n}")
        await wait_until(lambda: same_env(a, b, env))
        await b.op("env.patch", id=env, patch=[{"op": "replace", "path": "/port", "value": n}])
        await wait_until(lambda: same_env(a, b, env))

    # No sleep can prove that nothing loops; a count can: per edit, at most its update to the
    # hub and on to the other daemon, and the other daemon's copy of it from the LAN to the hub
    # and on (4 hub-link messages). An update going round would add to every window, forever.
    for n in range(3):
        before = traffic()
        await barrier(n)
        # (+4: the hub's copies of the window before, when the LAN was faster; +2: a ping, a pong)
        assert traffic() - before <= 2 * 4 + 4 + 2
    assert await a.get(env, "/name") == "barrier2" and await a.get(env, "/port") == 2
    admin.close()


async def test_cli_attach_detach_status_and_restart(hubs, base, nursery, capsys, monkeypatch):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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
    key = ["--hub-key", hub.key.lower().replace("-", "")]  # as typed: case, dashes ignored
    url = f"http://{LOCAL}:{hub.port}/"
    assert await run("space", "hub", "Team", url, "--token", token, *key) == 0
    out = capsys.readouterr().out  # the hub's answer, once it came
    assert out == f"Team: syncing through {hub.url} (hub key {hub.key})\n"
    assert (await a.hub())["state"] == "connected"
    assert await run("status") == 0
    out = capsys.readouterr().out
    assert f"\nhubs (1):\n  {hub.url}: connected as alice" in out and token not in out
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
    assert await run("space", "hub", space, hub.url, "--token", "-", *key) == 0
    await hub_state(a, "connected")
    admin.close()


async def test_cli_space_hub_waits_for_the_hubs_answer(hubs, base, nursery, capsys):
    """`space hub` exits 0 once the hub accepted the space, and 1 with one line naming the
    hub's refusal (the old command stored the attachment and exited 0 whatever the hub said);
    the attachment is kept in every case, and retried."""
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
    token = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    sock = ["--socket", str(a.socket_path)]
    await a.op("space.create", name="Team")

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(cli.main, [*sock, "space", "hub", "Team", *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    key = ("--hub-key", hub.key)
    code, out, err = await run(hub.url, "--token", "WRONG", *key)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "refused: unauthorized" in err and "kept" in err
    assert (await a.hub())["reason"] == "unauthorized"  # kept, and retried

    code, out, err = await run(hub.url, "--token", token)  # no key given: the URL's pin
    assert (code, err) == (0, "") and "syncing through" in out

    stranger = Identity.generate("x").device_id
    code, _, err = await run(hub.url, "--token", token, "--hub-key", stranger)
    assert code == 1 and "refused: hub-key-changed" in err and stranger in err
    code, _, err = await run(hub.url, "--token", token, "--hub-key", "not-a-key")
    assert code == 1 and "fingerprint" in err
    with pytest.raises(SystemExit) as usage:  # a key, or trust the first one: not both
        cli.build_parser().parse_args(["space", "hub", "T", "--token=t", *key, "--trust-first-use"])
    assert usage.value.code == 2

    await hub.stop()  # nobody answers: refused as unreachable, at once
    code, _, err = await run(hub.url, "--token", token, *key)
    assert code == 1 and "refused: unreachable" in err
    code, out, err = await run(hub.url, "--token", token, *key, "--wait", "0")
    assert (code, out, err) == (0, "", "")  # only stored, as before
    admin.close()


async def test_the_token_never_reaches_the_hub(hubs, base, nursery, monkeypatch):
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

    hub = await hubs.new().start(nursery)
    admin = hub.admin()
    token = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    space, [env] = await team(a, hub, token)
    await hub_state(a, "connected")
    await wait_until(lambda: _async(env in hub.stored(space)))
    await a.set_name(env, "after connecting")
    await hub_holds(hub, space, a, env)  # so the boxes that carried the edit were captured
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


async def test_a_changed_hub_key_is_refused_until_attached_again(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
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

    # nothing syncs through it: b (attached after the change, given the new key) does not get
    # a's edits, and the hub never admits a
    await join(b, a, space, token2, hub_key=hub.key)
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))  # what the hub stored before the change
    link = a.daemon.hubs.dialers[hub.url]
    tried = link.attempt
    await a.set_name(env, "not through an unknown hub")
    # a dials again after the edit and is refused before it sends anything (not a fixed sleep)
    outcome = await link.wait_settled(tried, TIMEOUT)
    assert outcome is not None and outcome["reason"] == "hub-key-changed"
    assert hub.server.docs.state_vector(space, env) != a.daemon.registry.get(env).doc.get_state()
    assert await b.get(env, "/name") != "not through an unknown hub"
    assert (await a.hub())["reason"] == "hub-key-changed"
    assert [d["device"] for d in hub.server.peer_endpoint.daemons()] == [
        b.daemon.identity.device_id
    ]

    # attaching again without a key keeps the pin; with the new key (or --trust-first-use),
    # the hub is trusted again
    await a.op("space.hub", space=space, url=hub.url, token=token1)
    await hub_state(a, "disconnected", "hub-key-changed")
    answer = await a.op("space.hub", space=space, url=hub.url, token=token1, wait=TIMEOUT)
    assert (answer["outcome"], answer["reason"]) == ("refused", "hub-key-changed")
    answer = await a.op(
        "space.hub", space=space, url=hub.url, token=token1, hub_key=hub.key, wait=TIMEOUT
    )
    assert answer == {
        "space": space,
        "url": hub.url,
        "outcome": "accepted",
        "status": "ok",
        "user": "alice",
        "hub_key": hub.key,
    }
    await hub_state(a, "connected")
    assert a.daemon.hubs.attached[hub.url]["device"] == hub.identity.device_id
    await wait_until(lambda: _eq(b.get(env, "/name"), "not through an unknown hub"))
    admin.close()


# --- the hub's key: fingerprints, invites, impostors ---------------------------------------------
def test_hub_key_fingerprints_are_normalized():
    key = make_identity("hub").device_id
    for typed in (key, key.lower(), key.replace("-", ""), f"  {key.lower()} "):
        assert normalize_hub_key(typed) == key
    for bad in ("", key[:-1], key + "A", "1" + key[1:], 42):
        with pytest.raises(ValueError):
            normalize_hub_key(bad)


OLD_CODE = (
    "pd1-uzqxgzdumvqw2ylomrkgkylnmfvvqiaha4dqobyha4dqobyha4dqobyha4dqobyha4dqobyha4dqobyha5qwiz2"
    "eirceirceirqwdadbnbyho4z2f4xtcmrxfyyc4mboge5dsg6nic3a"
)
"""`encode_invite` of `OLD_INVITE` before invites could carry a hub key (no "hk" in the map)."""
OLD_INVITE = Invite("team", "Team", b"\x07" * 32, "D" * 7, (), "ws://127.0.0.1:9")


def test_invites_carry_the_hub_key_and_old_codes_still_decode():
    key = make_identity("hub").device_id
    invite = replace(OLD_INVITE, hub_key=key)
    assert decode_invite(encode_invite(invite)) == invite
    assert decode_invite(OLD_CODE) == OLD_INVITE  # a code made before hub keys existed
    assert encode_invite(OLD_INVITE) == OLD_CODE  # no key: exactly the old format
    assert decode_invite(encode_invite(replace(invite, hub=None))).hub_key is None  # no URL


def test_an_unpinned_hub_gets_only_the_hello_unless_trusted_on_first_use():
    """Sans-I/O: without a key for the hub and without leave to trust its first one, the daemon
    closes the handshake after the hub's hello: the hub never gets an auth (no token proof, no
    space id) nor a sync message."""
    daemon, hub = make_identity("daemon"), make_identity("hub")
    for trust, pinned in ((False, None), (False, daemon.device_id), (True, None)):
        dh, hh = FakeHost([make_space("s1")]), FakeHost([make_space("s1")])
        dh.add_doc("env1", ["s1"], {"secret": 1})
        hh.share("env1", "s1")
        auth = HubClientAuth("t", {"s1": "Team"}, pinned, trust_first_use=trust)
        d = MemoryConnection(daemon, dh, dialer=True, now=0.0, auth=auth)
        h = MemoryConnection(hub, hh, dialer=False, now=0.0, auth=HubSide("s1"))
        exchange(d, h)
        if trust:
            assert d.state == h.state == "open" and hh.values("env1") == {"secret": 1}
            continue
        [closed] = [e for e in drain_events(d) if isinstance(e, Closed)]
        assert closed.reason == ("hub-key-changed" if pinned else HUB_KEY_UNKNOWN)
        assert hub.device_id in closed.detail
        assert h.handshake.state == "wait-auth" and h.established is None
        assert hh.applied == [] and h.closed is not None


def record_dialers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every message the in-process dialers send: cleartext ones as they are, boxes as the
    plaintext sealed in them (what the other end, impostor or not, can read)."""
    sent: list[dict[str, Any]] = []
    seal, init, send = SecureChannel.seal, SecureChannel.__init__, PeerConnection.data_to_send

    def recording_init(channel: SecureChannel, keys: Any, *, dialer: bool) -> None:
        init(channel, keys, dialer=dialer)
        channel._test_dialer = dialer  # type: ignore[attr-defined]

    def recording_seal(channel: SecureChannel, inner: dict[str, Any]) -> bytes:
        if getattr(channel, "_test_dialer", False):
            sent.append(inner)
        return seal(channel, inner)

    def recording_send(conn: PeerConnection) -> list[bytes]:
        data = send(conn)
        if conn.dialer:
            sent.extend(m for m in map(cbor2.loads, data) if m.get("t") != "box")
        return data

    monkeypatch.setattr(SecureChannel, "__init__", recording_init)
    monkeypatch.setattr(SecureChannel, "seal", recording_seal)
    monkeypatch.setattr(PeerConnection, "data_to_send", recording_send)
    return sent


async def test_an_impostor_at_the_hubs_url_receives_no_document(hubs, base, nursery, monkeypatch):
    """A second hub instance with another key answers at the hub's URL (ws://, loopback). A
    daemon given the real key, or given none and not allowed to trust a first key, sends it its
    hello and a close, nothing else; the real hub, back at the URL, gets everything. (The old
    daemon trusted whatever key answered first and synced the space's documents to it.)"""
    hub = await hubs.new().start(nursery)
    real_key = hub.key
    admin = hub.admin()
    token = admin.add_user("alice")
    await hub.stop()
    hub.identity = Identity.generate("impostor")  # same URL, same accounts: only the key differs
    await hub.start(nursery)
    assert hub.key != real_key
    sent = record_dialers(monkeypatch)
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    spaces = {}
    for dev in (a, b):
        spaces[dev] = await team_without_hub(dev, f"{dev.name}'s env")

    async def attach(dev: Dev, **key: Any) -> dict[str, Any]:
        space, _ = spaces[dev]
        return await dev.op("space.hub", space=space, url=hub.url, token=token, wait=TIMEOUT, **key)

    answer = await attach(a, hub_key=real_key)  # the real key was given
    assert (answer["outcome"], answer["reason"]) == ("refused", "hub-key-changed")
    assert hub.key in answer["detail"] and answer["hub_key"] == real_key
    answer = await attach(b)  # no key known, ws:// does not authenticate: no first-use trust
    assert (answer["outcome"], answer["reason"]) == ("refused", HUB_KEY_UNKNOWN)
    assert answer["hub_key"] is None and "--hub-key" in answer["detail"]
    await hub_row_state(b, "disconnected", HUB_KEY_UNKNOWN)
    assert (await b.hub())["device"] is None  # the impostor's claims are not shown as facts

    assert {m["t"] for m in sent} == {"hello", "close"}  # no auth, no sync: no document
    assert {m["device"] for m in sent if m["t"] == "hello"} == {
        d.daemon.identity.device_id for d in (a, b)
    }
    for space, [env] in spaces.values():
        assert admin.space(space) is None and hub.stored(space) == []
        assert not any(env.encode() in cbor2.dumps(m) for m in sent)
    assert hub.server is not None and hub.server.peer_endpoint.daemons() == []
    assert a.daemon.hubs.pinned(hub.url) == real_key and b.daemon.hubs.pinned(hub.url) is None

    # the real hub is back at its URL: a (given its key) and b (now given it too) sync
    await hub.stop()
    hub.identity = None
    await hub.start(nursery)
    assert hub.key == real_key
    for dev, key in ((a, {}), (b, {"hub_key": real_key})):
        answer = await attach(dev, **key)
        # a's own dialer (it kept the key) may have registered the space first: then "ok"
        registered = ("registered", "ok") if dev is a else ("registered",)
        assert (answer["outcome"], answer["hub_key"]) == ("accepted", real_key)
        assert answer["status"] in registered, answer
        space, [env] = spaces[dev]
        await hub_holds(hub, space, dev, env)
        assert (await dev.hub())["device"] == real_key
    admin.close()


async def test_trust_first_use_pins_the_first_key_over_ws(hubs, base, nursery):
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
    token = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    space, [env] = await team_without_hub(a, "env")
    answer = await a.op(
        "space.hub", space=space, url=hub.url, token=token, trust_first_use=True, wait=TIMEOUT
    )
    assert (answer["outcome"], answer["hub_key"]) == ("accepted", hub.key)
    assert a.daemon.hubs.attached[hub.url] == {"token": token, "spaces": [space], "device": hub.key}
    assert (await a.hub())["hub_key"] == hub.key
    await hub_holds(hub, space, a, env)
    code = (await a.op("space.invite", space=space, addresses=[]))["code"]
    assert decode_invite(code).hub_key == hub.key  # invites now vouch for the pinned key

    # pinned: another key at the URL is refused from now on
    await hub.stop()
    hub.identity = Identity.generate("impostor")
    await hub.start(nursery)
    await hub_state(a, "disconnected", "hub-key-changed")
    admin.close()


async def test_hub_status_prints_the_key_the_hub_serves_with(
    hubs, base, nursery, capsys, monkeypatch
):
    hub_dir = base / "hub"
    cluster = hubs.cluster
    if cluster is not None:  # `hub status` of a cluster, as its admin runs it (docs/hub.md)
        monkeypatch.setenv("PEERDAEMON_HUB_CLUSTER_REDIS", cluster.redis_url)
        monkeypatch.setenv("PEERDAEMON_HUB_CLUSTER_POSTGRES", cluster.dsn)

    async def status(*extra: str) -> str:
        code = await trio.to_thread.run_sync(
            cli.main, ["hub", "status", "--data-dir", str(hub_dir), *extra]
        )
        assert code == 0
        return capsys.readouterr().out

    before = await status()
    [key] = [line.split(": ", 1)[1] for line in before.splitlines() if line.startswith("hub key")]
    assert "running: no" in before
    if cluster is None:  # before the hub ever ran: the key is made now, to hand out
        assert normalize_hub_key(key) == key
    else:  # a cluster's key is made by its first process, in its PostgreSQL
        assert key == "(none yet: start the hub once)"
    hub = await hubs.new().start(nursery)
    if cluster is None:
        assert hub.key == key  # the hub serves with that key
    else:
        key = hub.key
    running = json.loads(await status("--json"))
    keys = ("data_dir", "running", "pid", "hub_key")
    assert {k: running[k] for k in keys} == {
        "data_dir": str(hub_dir),
        "running": True,
        "pid": os.getpid(),
        "hub_key": key,
    }
    await hub.stop()


# --- small helpers --------------------------------------------------------------------------------
async def team_without_hub(dev: Dev, name: str) -> tuple[str, list[str]]:
    """A space on `dev` with one shared environment, not attached to any hub yet."""
    space = (await dev.op("space.create", name=f"{dev.name}'s team"))["id"]
    env_id = await dev.import_env(name)
    await dev.op("env.share", id=env_id, space=space)
    return space, [env_id]


async def _async(value: Any) -> Any:
    return value


def _errors_of(dev: Dev) -> list[Any]:
    return [e for h in dev.daemon.hubs.dialers.values() for e in h.live_errors()]


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected


async def test_an_environment_that_fails_on_one_side_is_its_error_not_the_links(
    hubs, base, nursery, monkeypatch
):
    """A document failing locally (docs/peer-protocol.md section 5): an update that fails to
    apply (on the daemon, then on the hub) is an `environment-error` event for that
    environment; the hub link stays up and the other environment goes on syncing both ways."""
    hub = await hubs.new().start(nursery)
    admin = hub.admin()
    alice = admin.add_user("alice")
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    space, [bad, good] = await team(a, hub, alice, envs=2)
    await join(b, a, space, alice)
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, bad))
    await wait_until(lambda: same_env(a, b, good))

    # b fails on every update of `bad` from the hub
    merge = b.daemon.registry.merge

    def failing_merge(env_id: str, update: bytes, origin: str, *args: Any, **kw: Any) -> Any:
        if env_id == bad and origin.startswith("hub:"):
            raise RuntimeError("a bug in b's merge")
        return merge(env_id, update, origin, *args, **kw)

    monkeypatch.setattr(b.daemon.registry, "merge", failing_merge)
    cursor = (await b.op("status"))["events"]
    await a.set_name(bad, "never reaches b")
    await a.set_name(good, "reaches b")
    await wait_until(lambda: _eq(b.get(good, "/name"), "reaches b"))

    async def b_error() -> Any:
        events = (await b.op("events.subscribe", since=cursor))["events"]
        errors = [e["data"] for e in events if e["type"] == "environment-error"]
        return errors[0] if errors else None

    error = await wait_until(b_error)
    assert error["id"] == bad and error["origin"] == f"hub:{hub.url}"
    assert "a bug in b's merge" in error["reason"]
    assert (await b.hub())["state"] == "connected"
    await b.set_name(good, "b still writes")
    await wait_until(lambda: _eq(a.get(good, "/name"), "b still writes"))
    monkeypatch.undo()

    # the hub fails on `good` from now on: its error, the link and `bad` go on
    assert hub.server is not None
    hub_events = hub.server.events
    hub_cursor = hub_events.last_id
    apply = hub.server.docs.apply

    def failing_apply(space_id: str, doc_id: str, *args: Any) -> Any:
        if doc_id == good:
            raise RuntimeError("a bug in the hub's store")
        return apply(space_id, doc_id, *args)

    monkeypatch.setattr(hub.server.docs, "apply", failing_apply)
    await a.set_name(good, "stays on a")
    await a.op("env.patch", id=bad, patch=[{"op": "replace", "path": "/port", "value": 4999}])
    await wait_until(lambda: _eq(b.get(bad, "/port"), 4999))

    async def hub_error() -> Any:
        errors = [
            e["data"] for e in hub_events.since(hub_cursor) if e["type"] == "environment-error"
        ]
        return errors[0] if errors else None

    error = await wait_until(hub_error)
    assert error["id"] == good and "a bug in the hub's store" in error["reason"]
    assert (await a.hub())["state"] == "connected" and (await b.hub())["state"] == "connected"
    admin.close()
