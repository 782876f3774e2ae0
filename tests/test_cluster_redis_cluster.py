"""The hub's scaled mode on a Redis Cluster (issue 14): three private masters
(`lab/servers.py`, `running_redis_cluster`) instead of one Redis.

Redis refuses a command over keys of several slots even when one master serves them all, so a
process reads one blocking XREAD per slot holding followed streams (`RoomBus.follow_slots`),
and each slot has its own epoch: a master that restarts empty resyncs only its rooms. The bus
tests check that on the bus alone; the hub tests run two real `peerdaemon hub serve --redis
redis+cluster://...` processes with y-websocket clients of rooms spread over the three masters.
"""

from __future__ import annotations

import os
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
from pycrdt import Doc, Map
from servers import (
    free_port,
    have_postgres,
    have_redis_cluster,
    running_postgres,
    running_redis_cluster,
)
from trio_websocket import ConnectionClosed, open_websocket_url

pytestmark = pytest.mark.skipif(
    not (have_redis_cluster() and have_postgres()),
    reason="needs redis-server, redis-cli and PostgreSQL",
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from peerdaemon.core.awareness import AwarenessEntry, encode_awareness  # noqa: E402
from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.bus import (  # noqa: E402
    CompactionLock,
    Counters,
    DeviceSlots,
    RoomBus,
    cluster_url,
    connect,
)
from peerdaemon.hub.cluster.protocol import Cursors, Kick, room_of, update_key  # noqa: E402
from peerdaemon.hub.cluster.store import DocStore, migrate  # noqa: E402
from peerdaemon.hub.cluster.worker import compact_room  # noqa: E402
from peerdaemon.hub.ywebsocket import (  # noqa: E402
    MSG_AWARENESS,
    awareness_message,
    decode_awareness,
)

HOST = "127.0.0.1"
START_TIMEOUT = 60.0


def spread_rooms(cluster, n: int, prefix: str = "env") -> list[str]:
    """`n` documents whose rooms' streams live on every master (at least two on each)."""
    docs = [f"{prefix}{i}" for i in range(n)]
    owners = [cluster.node_of(update_key(room_of(SPACE, d))) for d in docs]
    assert all(owners.count(node) >= 2 for node in cluster.nodes), "rooms not spread"
    return docs


async def until(predicate, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


# -- the bus alone --------------------------------------------------------------------------------
def test_cluster_urls_are_told_apart():
    assert cluster_url("redis+cluster://192.0.2.1:7000") == "redis://192.0.2.1:7000"
    assert cluster_url("rediss+cluster://u:p@h:7000") == "rediss://u:p@h:7000"
    assert cluster_url("redis://h:6379/0") is None
    assert cluster_url("rediss://h:6379/0") is None


async def test_a_reader_follows_rooms_on_every_master_and_a_master_lost_resyncs_only_its_rooms(
    tmp_path,
):
    """Rooms in slots of all three masters (and the kicks) read by one `follow_slots`; a master
    killed and restarted empty makes the reader resync exactly the rooms whose streams it held,
    among them one whose epoch only an append had learnt (its read had not started yet), and
    the reading goes on there."""
    with running_redis_cluster(tmp_path / "redis", persist=False) as cluster:
        docs = spread_rooms(cluster, 12)
        rooms = [room_of(SPACE, d) for d in docs]
        victim = cluster.node_of(update_key(rooms[0]))
        late = next(
            room_of(SPACE, f"late{i}")
            for i in range(100)
            if cluster.node_of(update_key(room_of(SPACE, f"late{i}"))) is victim
        )
        async with connect(cluster.url) as w, connect(cluster.url, blocking_reads=True) as r:
            writer, reader = RoomBus(w, "w"), RoomBus(r, "r")
            assert writer.clustered and reader.clustered
            cursors = Cursors()
            writer.cursors = cursors
            for room in rooms:
                cursors.add(room)
            got: list = []
            lost: list[list[str]] = []
            changed = trio.Event()

            async def wait_changed() -> None:
                nonlocal changed
                await changed.wait()
                changed = trio.Event()

            def seen(room: str, data: bytes) -> bool:
                return any(e.room == room and e.data == data for e in got)

            async def all_seen(data: bytes, among: list[str]) -> bool:
                return all(seen(room, data) for room in among)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: reader.follow_slots(
                        cursors, got.extend, wait_changed, on_lost=lost.append, block_ms=500
                    )
                )
                await trio.sleep(0.5)  # (the rooms' epochs read, the reads blocked)
                for room in rooms:
                    await writer.publish_update(room, b"one", "w:1")
                await until(lambda: all_seen(b"one", rooms), 10)
                await writer.kick(Kick("unauthorized", user="u"))

                async def kicked() -> bool:
                    return any(e.kick is not None for e in got)

                await until(kicked, 10)
                # a room followed now, appended to before its read starts: the append's
                # epoch is the one its read will compare with
                cursors.add(late)
                await writer.publish_update(late, b"late", "w:1")
                assert late in cursors.room_epochs
                held = sorted(
                    room for room in [*rooms, late] if cluster.node_of(update_key(room)) is victim
                )
                await trio.to_thread.run_sync(lambda: victim.restart(empty=True))
                await trio.to_thread.run_sync(cluster.wait_ok)
                # the late room appended to again before its read starts: the epoch its
                # append sets now is a new one, not the one it set before the loss
                for room in [late, *rooms]:
                    if room != late:
                        changed.set()  # (the late room's read starts)
                    while True:  # (the client may still be finding the master back)
                        try:
                            await writer.publish_update(room, b"two", "w:1")
                            break
                        except Exception:
                            await trio.sleep(0.1)
                await until(lambda: all_seen(b"two", [*rooms, late]), 20)

                async def resynced() -> bool:
                    return sorted(r for batch in lost for r in batch) == held

                await until(resynced, 10)
                assert not seen(late, b"late")  # (lost with its master before any read)
                nursery.cancel_scope.cancel()
        assert 2 <= len(held) < len(rooms)


async def test_counters_device_slots_locks_and_heartbeats_work_on_a_cluster(tmp_path):
    """Each key in one slot (Lua scripts included); the process list asks every master."""
    with running_redis_cluster(tmp_path / "redis", persist=False) as cluster:
        async with connect(cluster.url) as client:
            names = [f"p{i}" for i in range(12)]
            for name in names:
                await RoomBus(client, name).heartbeat(5000, name.encode())
            homes = {cluster.node_of(f"pd:{{p:{name}}}:alive").port for name in names}
            assert len(homes) == 3  # (the list below is read from all three)
            bus = RoomBus(client, "p0")
            assert await bus.processes() == {n: n.encode() for n in names}
            assert await bus.alive("p3") and not await bus.alive("nobody")
            counters = Counters(client)
            assert [await counters.hit("mock:x", 1000) for _ in range(3)] == [1, 2, 3]
            assert await counters.get("mock:x") == 3
            slots = DeviceSlots(client)
            assert await slots.acquire("alice", "d1", "p0:1", 1, 5000)
            assert not await slots.acquire("alice", "d2", "p1:1", 1, 5000)
            assert await slots.devices("alice") == ["d1"]
            locks = CompactionLock(client)
            token = await locks.acquire(room_of(SPACE, "env1"), 5000)
            assert token is not None and await locks.acquire(room_of(SPACE, "env1"), 5000) is None
            assert await locks.renew(room_of(SPACE, "env1"), token, 5000)
            assert await locks.release(room_of(SPACE, "env1"), token)
            assert await bus.server_time_ms() > 0


# -- two hub processes on a Redis Cluster -----------------------------------------------------------
class Hub:
    """One `peerdaemon hub serve` process of the cluster."""

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

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # by pid
                self.proc.wait(30)

    def url(self, token: str, doc: str, device: str = "tests") -> str:
        return f"ws://{HOST}:{self.port}/yjs/{SPACE}/{doc}?token={token}&device={device}"


class Writer:
    """A y-websocket client of one room that remembers every key it set."""

    def __init__(self, name: str, token: str, doc: str, device: str = "tests") -> None:
        self.name = name
        self.token = token
        self.docname = doc
        self.device = device
        self.doc = Doc()
        self.sent: set[str] = set()
        self.client: YClient | None = None
        self.n = 0
        self.closed: int | None = None

    @asynccontextmanager
    async def connected(self, hub: Hub):
        url = hub.url(self.token, self.docname, self.device)
        async with open_websocket_url(url, max_message_size=64 << 20) as ws:
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


async def stored_keys(dsn: str, doc: str) -> set[str]:
    store = DocStore(dsn)
    try:
        loaded = await store.load(SPACE, doc)
    finally:
        store.close()
    ydoc = Doc()
    for update in loaded.updates if loaded else []:
        ydoc.apply_update(update)
    return set(ydoc.get("m", type=Map).keys())


def admin(hub: Hub, *argv: str) -> str:
    """`peerdaemon hub ...` as an admin runs it against the cluster."""
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


async def closed_with(url: str, *, timeout: float = 5.0) -> int:
    with trio.fail_after(timeout):
        try:
            async with open_websocket_url(url) as ws:
                while True:  # (whatever the hub sends first: it closes it)
                    await ws.get_message()
        except ConnectionClosed as exc:
            return exc.reason.code
    raise AssertionError("not closed")


@pytest.fixture
def rcluster(tmp_path):
    with (
        running_redis_cluster(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        with ClusterAccounts.open_pg(pg.dsn) as accounts:
            tokens = {user: accounts.add_user(user) for user in ("alice", "bob")}
            accounts.create_space(SPACE, "alice", "Team")
            accounts.add_member(SPACE, "bob")
        assert redis.url.startswith("redis+cluster://")
        hubs = [Hub(f"hub{i}", tmp_path / f"hub{i}", redis.url, pg.dsn) for i in range(2)]
        try:
            for hub in hubs:
                hub.start()
            yield hubs, tokens, redis, pg
        finally:
            for hub in hubs:
                hub.stop()


@asynccontextmanager
async def all_connected(writers: list[Writer], hubs: list[Hub]):
    """Each writer connected to `hubs[i % 2]`."""
    async with trio.open_nursery() as nursery:
        ready = [trio.Event() for _ in writers]
        done = trio.Event()

        async def hold(i: int, writer: Writer) -> None:
            async with writer.connected(hubs[i % len(hubs)]):
                ready[i].set()
                await done.wait()

        for i, writer in enumerate(writers):
            nursery.start_soon(hold, i, writer)
        for event in ready:
            await event.wait()
        yield
        done.set()


async def test_rooms_on_every_master_converge_across_processes_with_awareness_and_compaction(
    rcluster,
):
    (one, two), tokens, redis, pg = rcluster
    docs = spread_rooms(redis, 9)
    writers = [
        Writer(f"{user}{doc}", tokens[user], doc) for doc in docs for user in ("alice", "bob")
    ]
    async with all_connected(writers, [one, two]):  # each room's two clients on two processes
        for _ in range(10):
            for writer in writers:
                await writer.edit()
        pairs = [(writers[i], writers[i + 1]) for i in range(0, len(writers), 2)]

        async def converged() -> bool:
            return all(a.keys() == b.keys() == a.sent | b.sent for a, b in pairs)

        await until(converged)
        # awareness crosses from process 1 to process 2 in a room on each master
        state = AwarenessEntry(4242, 1, '{"user":{"name":"a"}}')
        for a, b in pairs[:3]:
            assert a.client is not None and b.client is not None
            await a.client.ws.send_message(awareness_message(encode_awareness([state])))

            async def b_sees(b: Writer = b) -> bool:
                assert b.client is not None
                return any(
                    e.client == 4242 and e.state == state.state
                    for m in b.client.messages
                    if m.kind == MSG_AWARENESS
                    for e in decode_awareness(m.payload)
                )

            await until(b_sees, 5)

    async def stored() -> bool:
        return all([await stored_keys(pg.dsn, a.docname) == a.sent | b.sent for a, b in pairs])

    await until(stored)
    # compaction on a cluster: PostgreSQL folds, the room's stream (on its master) is trimmed
    store = DocStore(pg.dsn)
    try:
        async with connect(redis.url) as client:
            bus, lock = RoomBus(client, "admin"), CompactionLock(client)
            for doc in docs[:3]:
                before = await bus.update_count(room_of(SPACE, doc))
                assert before >= 20
                folded = await compact_room(bus, lock, store, SPACE, doc, commit_lag_ms=0)
                assert folded
                assert await bus.update_count(room_of(SPACE, doc)) < before
    finally:
        store.close()
    for hub in (one, two):  # a new client, on either process, gets every room whole
        for (a, b), doc in zip(pairs[:3], docs, strict=False):
            late = Writer("late", tokens["bob"], doc)
            async with late.connected(hub):
                assert late.keys() == a.sent | b.sent


async def test_a_master_killed_and_restarted_empty_loses_nothing_accepted(rcluster):
    """kill -9 of the master holding some rooms' streams in the middle of edits on every room,
    then its restart without data: the processes resync those rooms from PostgreSQL and
    republish what it lacks; every client and PostgreSQL end with every edit."""
    (one, two), tokens, redis, pg = rcluster
    docs = spread_rooms(redis, 6)
    victim = redis.node_of(update_key(room_of(SPACE, docs[0])))
    writers = [
        Writer(f"{user}{doc}", tokens[user], doc) for doc in docs for user in ("alice", "bob")
    ]
    pairs = [(writers[i], writers[i + 1]) for i in range(0, len(writers), 2)]

    async def edits(n: int) -> None:
        for _ in range(n):
            for writer in writers:
                await writer.edit()
            await trio.sleep(0.01)

    async with all_connected(writers, [one, two]):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(edits, 30)
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(victim.kill9)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(lambda: victim.restart(empty=True))
        await edits(5)

        async def converged() -> bool:
            return all(a.keys() == b.keys() == a.sent | b.sent for a, b in pairs)

        try:
            await until(converged, 60)
        except trio.TooSlowError:
            lacking = {
                (w.docname, w.name): sorted((a.sent | b.sent) - w.keys())[:5]
                for a, b in pairs
                for w in (a, b)
                if w.keys() != a.sent | b.sent
            }
            raise AssertionError(f"not converged: {lacking}\n{one.tail()}\n{two.tail()}") from None

    async def stored() -> bool:
        try:
            return all([await stored_keys(pg.dsn, a.docname) == a.sent | b.sent for a, b in pairs])
        except Exception:
            return False

    await until(stored, 60)
    logs = one.tail(1 << 30) + two.tail(1 << 30)
    assert "redis restarted empty (new epoch of" in logs


async def test_revocation_cuts_and_the_device_limit_holds_on_both_processes(rcluster):
    (one, two), tokens, redis, _pg = rcluster
    a1, a2 = Writer("a1", tokens["alice"], "env1"), Writer("a2", tokens["alice"], "env2")
    b1, b2 = Writer("b1", tokens["bob"], "env1", "b1"), Writer("b2", tokens["bob"], "env2", "b2")
    async with b1.connected(one), b2.connected(two):
        # bob's two devices (the default limit) on two processes: a third is cut on either
        assert await closed_with(one.url(tokens["bob"], "env3", device="b3")) == 4429
        assert await closed_with(two.url(tokens["bob"], "env3", device="b3")) == 4429
        async with a1.connected(one), a2.connected(two):
            await trio.to_thread.run_sync(lambda: admin(one, "token", "revoke", tokens["alice"]))

            async def alice_cut() -> bool:
                return a1.closed is not None and a2.closed is not None

            await until(alice_cut, 2.0)
            assert a1.closed == a2.closed == 4401
            assert b1.closed is b2.closed is None
    for hub in (one, two):  # at once, by the kick through the cluster
        assert "accounts changed (kick)" in hub.tail(1 << 30)
