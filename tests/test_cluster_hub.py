"""The hub's scaled mode end to end (issue 14): real `peerdaemon hub serve --redis --postgres`
processes on one private Redis and one private PostgreSQL (tests/servers.py), y-websocket
clients of one room spread across them.

What a client sent and the hub accepted is checked against the union of what the clients sent:
every key a client set must end in PostgreSQL (docs/hub-cluster.md, "Accepted"), through kill
-9 of a hub process, a Redis that restarts empty and a PostgreSQL restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from helpers import SPACE, YClient
from pycrdt import Doc, Map, Text
from servers import free_port, have_postgres, have_redis, running_postgres, running_redis
from trio_websocket import ConnectionClosed, open_websocket_url

pytestmark = pytest.mark.skipif(
    not (have_redis() and have_postgres()), reason="needs redis-server and PostgreSQL"
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from peerdaemon.core.awareness import AwarenessEntry, encode_awareness  # noqa: E402
from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.store import DocStore, migrate  # noqa: E402
from peerdaemon.hub.ywebsocket import (  # noqa: E402
    MSG_AWARENESS,
    awareness_message,
    decode_awareness,
)

DOC = "env1"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0


class Hub:
    """One `peerdaemon hub serve` process of the cluster (accounts in the shared data dir)."""

    def __init__(self, name: str, data_dir: Path, redis_url: str, dsn: str) -> None:
        self.name = name
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.dsn = dsn
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{name}.log"
        data_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "peerdaemon", "hub", "serve",
            "--data-dir", str(self.data_dir),
            "--listen", f"{HOST}:{self.port}",
            "--redis", self.redis_url,
            "--postgres", self.dsn,
            "--log-level", "debug",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection((HOST, self.port), 0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not start:\n{self.tail()}") from None
                time.sleep(0.05)  # bounded wait for the listening port

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by pid
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def url(self, token: str, doc: str = DOC, device: str = "tests") -> str:
        return f"ws://{HOST}:{self.port}/yjs/{SPACE}/{doc}?token={token}&device={device}"


class Writer:
    """A y-websocket client that remembers every key it set (what it sent), keeping its
    document across reconnections (a provider does: it resyncs on the next connection)."""

    def __init__(self, name: str, token: str, device: str = "tests") -> None:
        self.name = name
        self.token = token
        self.device = device
        self.doc = Doc()
        self.sent: set[str] = set()
        self.client: YClient | None = None
        self.n = 0
        self.closed: int | None = None  # the close code the hub sent

    @asynccontextmanager
    async def connected(self, hub: Hub):
        async with open_websocket_url(
            hub.url(self.token, device=self.device), max_message_size=64 << 20
        ) as ws:
            self.client = YClient(ws, self.doc)
            await self.client.sync()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump)
                yield self
                nursery.cancel_scope.cancel()
            self.client = None

    async def _pump(self) -> None:
        assert self.client is not None
        try:
            while True:
                await self.client.recv()
        except ConnectionClosed as exc:
            self.closed = exc.reason.code

    async def edit(self) -> None:
        assert self.client is not None
        key = f"{self.name}-{self.n}"
        self.n += 1
        self.sent.add(key)
        await self.client.edit(key, self.n)

    def keys(self) -> set[str]:
        return set(self.doc.get("m", type=Map).keys())


async def closed_with(url: str, *, edit: bool = False, timeout: float = 5.0) -> int:
    """Connect (and edit), then wait for the hub to close the connection: its close code."""
    with trio.fail_after(timeout):
        try:
            async with open_websocket_url(url) as ws:
                client = YClient(ws)
                await client.sync()
                if edit:
                    await client.edit("k", 1)
                while True:
                    await client.recv()
        except ConnectionClosed as exc:
            return exc.reason.code
    raise AssertionError("not closed")


async def stored_keys(dsn: str) -> set[str]:
    store = DocStore(dsn)
    try:
        loaded = await store.load(SPACE, DOC)
    finally:
        store.close()
    doc = Doc()
    for update in loaded.updates if loaded else []:
        doc.apply_update(update)
    return set(doc.get("m", type=Map).keys())


async def until(predicate, timeout: float = 30.0, what: str = "") -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


@pytest.fixture
def cluster(tmp_path, request):
    """A cluster of `request.param` hub processes (2 by default)."""
    count = getattr(request, "param", 2)
    with (
        running_redis(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        with ClusterAccounts.open_pg(pg.dsn) as accounts:  # as `hub user add` does
            tokens = {user: accounts.add_user(user) for user in ("alice", "bob")}
            accounts.create_space(SPACE, "alice", "Team")
            accounts.add_member(SPACE, "bob")
        hubs = [Hub(f"hub{i}", tmp_path / f"hub{i}", redis.url, pg.dsn) for i in range(count)]
        try:
            for hub in hubs:
                hub.start()
            yield hubs, tokens, redis, pg
        finally:
            for hub in hubs:
                hub.stop()


def admin(hub: Hub, *argv: str) -> str:
    """`peerdaemon hub ...` as an admin runs it against the cluster (its settings in the
    environment, as a config file would hold them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERDAEMON_")}
    env.update(
        PEERDAEMON_HUB_CLUSTER_POSTGRES=hub.dsn,
        PEERDAEMON_HUB_CLUSTER_REDIS=hub.redis_url,
        PEERDAEMON_HUB_DIR=str(hub.data_dir),
    )
    argv = (sys.executable, "-m", "peerdaemon", "hub", *argv)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_clients_of_one_room_on_two_processes_converge_and_postgres_holds_it(cluster):
    (one, two), tokens, _redis, pg = cluster
    a, b = Writer("a", tokens["alice"]), Writer("b", tokens["bob"])
    async with a.connected(one), b.connected(two):
        for _ in range(30):
            await a.edit()
            await b.edit()
        union = a.sent | b.sent

        async def converged() -> bool:
            return a.keys() == b.keys() == union

        await until(converged, what="clients converge")
        # a client that arrives later, on either process, gets the whole document
        for hub in (one, two):
            late = Writer("late", tokens["bob"])
            async with late.connected(hub):
                assert late.keys() == union

    async def stored() -> bool:
        return await stored_keys(pg.dsn) == union

    await until(stored, what="postgres holds every edit")


async def test_kill9_redis_and_postgres_restarts_lose_nothing_accepted(cluster):
    (one, two), tokens, redis, pg = cluster
    a, b, c = Writer("a", tokens["alice"]), Writer("b", tokens["bob"]), Writer("c", tokens["bob"])

    async def edits(writer: Writer, n: int) -> None:
        for _ in range(n):
            await writer.edit()
            await trio.sleep(0.005)

    async def converged() -> bool:
        union = a.sent | b.sent | c.sent
        return a.keys() == b.keys() == c.keys() == union

    async with b.connected(two), c.connected(two):
        async with a.connected(one):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edits, b, 40)
                nursery.start_soon(edits, c, 40)
                try:
                    await edits(a, 20)
                finally:
                    await trio.to_thread.run_sync(one.kill9)  # in the middle of edits
        # a's process is gone: it reconnects to the other and resumes by a Yjs sync
        async with a.connected(two):
            await edits(a, 10)
            await until(converged, what="converged after the kill")
        await trio.to_thread.run_sync(one.start)  # the killed process comes back
        async with a.connected(one):
            # Redis restarts empty in the middle of edits on both processes
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edits, a, 30)
                nursery.start_soon(edits, b, 30)
                await trio.sleep(0.05)
                await trio.to_thread.run_sync(lambda: redis.restart(empty=True))
            await edits(c, 5)
            await until(converged, what="converged after Redis restarted empty")
            # PostgreSQL restarts in the middle of edits
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edits, a, 30)
                nursery.start_soon(edits, b, 30)
                await trio.sleep(0.05)
                await trio.to_thread.run_sync(lambda: pg.restart(kill=True))
            await until(converged, what="converged after PostgreSQL restarted")
    union = a.sent | b.sent | c.sent
    assert len(union) == 90 + 100 + 45

    async def stored() -> bool:
        try:
            return await stored_keys(pg.dsn) == union
        except Exception:
            return False

    await until(stored, timeout=60, what="postgres holds every edit")
    assert "resyncing rooms" in one.tail() + two.tail()  # (the Redis restart was seen)


async def test_what_a_killed_process_relayed_but_had_not_committed_is_stored_by_another(cluster):
    """Process 1 relays a's edits to process 2 at once, but its commits are held up (a lock on
    the table); it is killed. a reconnects to process 2, which holds the edits already, so a
    sends nothing: process 2 must store them itself once process 1's heartbeat is gone."""
    (one, two), tokens, _redis, pg = cluster
    a, b = Writer("a", tokens["alice"]), Writer("b", tokens["bob"])
    async with b.connected(two):
        async with a.connected(one):
            await a.edit()  # (the room exists on both, so process 2 follows it)

            async def seen() -> bool:
                return b.keys() == a.sent

            await until(seen)
            blocker = await trio.to_thread.run_sync(
                lambda: psycopg.connect(pg.dsn, autocommit=False)
            )
            try:
                await trio.to_thread.run_sync(
                    lambda: blocker.execute("LOCK TABLE doc_updates IN EXCLUSIVE MODE")
                )
                for _ in range(20):
                    await a.edit()
                await until(seen)  # relayed through process 2, not committed by process 1
                await trio.to_thread.run_sync(one.kill9)
            finally:
                await trio.to_thread.run_sync(blocker.rollback)
                blocker.close()
        async with a.connected(two):
            await a.edit()
            union = a.sent | b.sent

            async def stored() -> bool:
                return await stored_keys(pg.dsn) == union

            await until(stored, what="postgres holds what process 1 relayed")


async def test_revocation_and_removal_cut_connections_on_every_process_within_a_second(cluster):
    (one, two), tokens, _redis, _pg = cluster
    a1, a2 = Writer("a1", tokens["alice"]), Writer("a2", tokens["alice"])
    b1, b2 = Writer("b1", tokens["bob"]), Writer("b2", tokens["bob"])
    async with a1.connected(one), a2.connected(two), b1.connected(one), b2.connected(two):
        await trio.to_thread.run_sync(lambda: admin(one, "token", "revoke", tokens["alice"]))

        async def alice_cut() -> bool:
            return a1.closed is not None and a2.closed is not None

        await until(alice_cut, timeout=1.0)
        assert a1.closed == a2.closed == 4401  # unauthorized
        assert b1.closed is b2.closed is None
        await b1.edit()  # bob goes on
        await trio.to_thread.run_sync(lambda: admin(two, "space", "remove-member", SPACE, "bob"))

        async def bob_cut() -> bool:
            return b1.closed is not None and b2.closed is not None

        await until(bob_cut, timeout=1.0)
        assert b1.closed == b2.closed == 4403  # forbidden
    for hub in (one, two):  # at once, by the kick (not at the next poll)
        assert hub.tail().count("accounts changed (kick)") == 2
    listed = admin(one, "token", "list")
    assert any("alice" in line and "revoked" in line for line in listed.splitlines())


async def test_awareness_crosses_processes_and_so_does_its_removal(cluster):
    (one, two), tokens, _redis, _pg = cluster
    a, b = Writer("a", tokens["alice"]), Writer("b", tokens["bob"])
    state = AwarenessEntry(4242, 1, '{"user":{"name":"a"}}')

    def states(writer: Writer) -> dict[int, str]:
        assert writer.client is not None
        out: dict[int, str] = {}
        for msg in writer.client.messages:
            if msg.kind == MSG_AWARENESS:
                for e in decode_awareness(msg.payload):
                    out[e.client] = e.state
        return out

    async with b.connected(two):
        async with a.connected(one):
            assert a.client is not None
            await a.client.ws.send_message(awareness_message(encode_awareness([state])))

            async def b_sees() -> bool:
                return states(b).get(4242) == state.state

            await until(b_sees, timeout=5)  # (not at the next 30 s expiry round)

        # a left: the removal of its state reaches process 2's clients too
        async def b_sees_it_gone() -> bool:
            return states(b).get(4242) == "null"

        await until(b_sees_it_gone, timeout=5)


INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_npm_y_websocket_clients_on_both_processes_converge(cluster):
    """The real `yjs` + `y-websocket` (tests/interop/cluster_yjs.mjs): four providers, two on
    each process, editing one Y.Text and one Y.Map at once, with awareness."""
    if not (INTEROP / "node_modules" / "y-websocket").exists():
        pytest.fail(f"y-websocket is not installed: run `npm ci --prefix {INTEROP}`")
    (one, two), tokens, _redis, pg = cluster
    urls = [f"ws://{HOST}:{hub.port}/yjs/{SPACE}" for hub in (one, two, one, two)]
    argv = [NODE or "node", str(INTEROP / "cluster_yjs.mjs"), "--urls", ",".join(urls)]
    argv += ["--room", DOC, "--token", tokens["alice"], "--device", "js", "--edits", "50"]
    with trio.fail_after(60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert done.returncode == 0 and result["ok"], (result, done.stderr.decode()[-2000:])
    assert result["keys"] == 200 and len(result["text"]) == 200
    assert result["awareness"] == [f"client-{i}" for i in range(4)]

    async def stored() -> bool:  # and PostgreSQL holds all of it
        store = DocStore(pg.dsn)
        try:
            loaded = await store.load(SPACE, DOC)
        finally:
            store.close()
        doc = Doc()
        for update in loaded.updates if loaded else []:
            doc.apply_update(update)
        return str(doc.get("text", type=Text)) == result["text"]

    await until(stored)


async def test_devices_per_user_holds_across_processes(cluster):
    """Two devices of alice (the default limit) on two processes: a third on either is cut with
    too-many-devices, though its process holds only one other; once one leaves, it may come."""
    (one, two), tokens, _redis, _pg = cluster
    d1, d2 = Writer("d1", tokens["alice"], "d1"), Writer("d2", tokens["alice"], "d2")
    async with d1.connected(one), d2.connected(two):
        # the local admission lets it in (one device here); the cluster's slots cut it
        assert await closed_with(one.url(tokens["alice"], device="d3")) == 4429
        extra = Writer("d1b", tokens["alice"], "d1")  # another connection of a known device
        async with extra.connected(two):
            await extra.edit()
            await trio.sleep(0.3)
            assert extra.closed is None
    d3 = Writer("d3", tokens["alice"], "d3")
    async with d3.connected(one):  # d1 and d2 gone: room for it
        await d3.edit()
        await trio.sleep(0.3)
        assert d3.closed is None


async def test_envs_per_space_holds_across_processes(cluster):
    """A document created on process 1 after process 2 started counts on process 2 too."""
    (one, two), tokens, _redis, _pg = cluster
    await trio.to_thread.run_sync(
        lambda: admin(one, "limits", "set", "--user", "alice", "envs_per_space", "1")
    )
    first = Writer("a", tokens["alice"])
    async with first.connected(one):
        await first.edit()  # env1: the space's one environment

        async def stored() -> bool:
            return await stored_keys(two.dsn) == first.sent

        await until(stored)
    assert await closed_with(two.url(tokens["bob"], doc="env2"), edit=True) == 4422


@pytest.mark.parametrize("cluster", [3], indirect=True)
async def test_three_processes_converge_through_a_kill9(cluster):
    hubs, tokens, _redis, pg = cluster
    writers = [
        Writer(f"w{i}", tokens["alice" if i % 2 else "bob"], f"dev{i % 2}") for i in range(3)
    ]
    async with writers[0].connected(hubs[0]), writers[1].connected(hubs[1]):
        async with writers[2].connected(hubs[2]):
            for _ in range(20):
                for w in writers:
                    await w.edit()
            await trio.to_thread.run_sync(hubs[2].kill9)
        async with writers[2].connected(hubs[0]):  # its client comes back on another
            for _ in range(10):
                for w in writers:
                    await w.edit()
            union = set().union(*(w.sent for w in writers))

            async def converged() -> bool:
                return all(w.keys() == union for w in writers)

            await until(converged)

    async def stored() -> bool:
        return await stored_keys(pg.dsn) == union

    await until(stored)


async def test_a_clean_stop_commits_what_is_queued(cluster):
    """SIGTERM while PostgreSQL holds the process's commits up (a table lock): it waits for
    them (a few seconds at most) before it exits, as the embedded store does."""
    (one, _two), tokens, _redis, pg = cluster
    a = Writer("a", tokens["alice"])
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg.dsn, autocommit=False))
    try:
        async with a.connected(one):
            await a.edit()

            async def first_stored() -> bool:
                return await stored_keys(pg.dsn) == a.sent

            await until(first_stored)
            await trio.to_thread.run_sync(
                lambda: blocker.execute("LOCK TABLE doc_updates IN EXCLUSIVE MODE")
            )
            for _ in range(10):
                await a.edit()
            await trio.sleep(0.2)  # (applied by the hub, its commit waiting for the lock)
            assert one.proc is not None
            one.proc.send_signal(signal.SIGTERM)
            await trio.sleep(1.0)
            assert one.proc.poll() is None  # still committing
    finally:
        await trio.to_thread.run_sync(blocker.rollback)
        blocker.close()
    await trio.to_thread.run_sync(lambda: one.proc.wait(15))

    async def stored() -> bool:
        return await stored_keys(pg.dsn) == a.sent

    await until(stored, timeout=5)
