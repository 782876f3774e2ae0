"""A cluster process under load (issue 14, docs/hub-cluster.md): a document loading from
PostgreSQL holds up only its own room, an update whose commit took long is not lost to a
compaction's trim, and a process can be watched (`hub status`, `/metrics`).

On a private Redis and PostgreSQL (tests/servers.py), with real `hub serve` processes
(tests/test_cluster_hub.py's cluster) or nodes run in the test's own trio loop."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import pytest
import trio
from helpers import SPACE, YClient
from pycrdt import Doc, Map
from servers import have_postgres, have_redis, running_postgres, running_redis

pytestmark = pytest.mark.skipif(
    not (have_redis() and have_postgres()), reason="needs redis-server and PostgreSQL"
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402
import test_cluster_hub  # noqa: E402
from test_cluster_hub import Writer, admin, until  # noqa: E402
from trio_websocket import open_websocket_url  # noqa: E402

from peerdaemon.core.events import EventLog  # noqa: E402
from peerdaemon.hub.cluster.node import ClusterNode  # noqa: E402
from peerdaemon.hub.cluster.protocol import room_of  # noqa: E402
from peerdaemon.hub.cluster.store import migrate  # noqa: E402
from peerdaemon.hub.cluster.worker import compact_room  # noqa: E402
from peerdaemon.hub.ywebsocket import YConn, sync_step1, sync_update  # noqa: E402

DOC = "env1"
cluster = test_cluster_hub.cluster  # its hub processes, Redis and PostgreSQL (a fixture)


def _seed(dsn: str, doc_id: str, **values: object) -> None:
    """A document in PostgreSQL as another process would have stored it."""
    doc = Doc()
    m = doc.get("m", type=Map)
    for k, v in values.items():
        m[k] = v
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO documents (space, doc) VALUES (%s, %s)", (SPACE, doc_id))
        conn.execute(
            "INSERT INTO doc_updates (space, doc, blob, origin) VALUES (%s, %s, %s, 'test')",
            (SPACE, doc_id, doc.get_update()),
        )


async def test_a_room_whose_load_is_held_up_holds_up_no_other_room(cluster):
    """Room `big` loads while PostgreSQL holds its table locked: the edits of another room
    of the same process keep flowing, and `big`'s client gets its first sync only once the
    document is loaded, with what it sent meanwhile applied after."""
    (one, _two), tokens, _redis, pg = cluster
    a, b = Writer("a", tokens["alice"]), Writer("b", tokens["bob"])
    await trio.to_thread.run_sync(lambda: _seed(pg.dsn, "big", seeded=1))
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg.dsn, autocommit=False))
    late = Doc()
    synced = trio.Event()

    async def join_big() -> None:
        async with open_websocket_url(one.url(tokens["bob"], doc="big")) as ws:
            client = YClient(ws, late)
            await ws.send_message(sync_step1(late.get_state()))  # before the hub speaks
            before = late.get_state()
            late.get("m", type=Map)["while-loading"] = 2
            await ws.send_message(sync_update(late.get_update(before)))
            while True:
                msg = await client.recv()
                if (msg.kind, msg.sub) == (0, 1):  # the hub's step 2: it had loaded
                    synced.set()

    try:
        async with a.connected(one), b.connected(one), trio.open_nursery() as nursery:
            await a.edit()  # the room's document exists before the lock (its creation reads)
            await until(lambda_async(lambda: b.keys() == a.sent), timeout=10)
            await trio.to_thread.run_sync(
                lambda: blocker.execute("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
            )
            nursery.start_soon(join_big)
            await trio.sleep(0.5)  # the hub is reading `big`, held by the lock
            for _ in range(5):
                await a.edit()
            await until(lambda_async(lambda: b.keys() == a.sent), timeout=5, what="relay")
            assert not synced.is_set()
            await trio.to_thread.run_sync(blocker.rollback)
            with trio.fail_after(15):
                await synced.wait()
            assert late.get("m", type=Map).to_py() == {"seeded": 1, "while-loading": 2}
            check = Writer("check", tokens["bob"])
            check_doc = check.doc
            async with open_websocket_url(one.url(tokens["bob"], doc="big")) as ws:
                await YClient(ws, check_doc).sync()
            assert check_doc.get("m", type=Map).to_py() == {"seeded": 1, "while-loading": 2}
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(blocker.rollback)
        blocker.close()


async def test_an_accounts_poll_held_up_by_postgresql_holds_up_no_room(cluster):
    """Every process re-reads the accounts every second (`refresh_async`, in a worker thread):
    with PostgreSQL holding that read (its version table locked), the process's rooms go on
    relaying (the read in the event loop stalled every room until the lock went)."""
    (one, _two), tokens, _redis, pg = cluster
    a, b = Writer("a", tokens["alice"]), Writer("b", tokens["bob"])
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg.dsn, autocommit=False))

    def poll_waits() -> bool:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name LIKE 'peerdaemon-hub accounts%%'"
            ).fetchone()
            return bool(row and row[0] >= 2)  # both processes' polls

    try:
        async with a.connected(one), b.connected(one):
            await a.edit()
            await until(lambda_async(lambda: b.keys() == a.sent), timeout=10)
            await trio.to_thread.run_sync(
                lambda: blocker.execute("LOCK TABLE accounts_version IN ACCESS EXCLUSIVE MODE")
            )
            with trio.fail_after(10):  # a process's poll is waiting for the lock
                while not await trio.to_thread.run_sync(poll_waits):
                    await trio.sleep(0.05)
            for _ in range(5):
                await a.edit()
            await until(lambda_async(lambda: b.keys() == a.sent), timeout=5, what="relay")
            await trio.to_thread.run_sync(blocker.rollback)
            await a.edit()
            await until(lambda_async(lambda: b.keys() == a.sent), timeout=5, what="after")
    finally:
        await trio.to_thread.run_sync(blocker.rollback)
        blocker.close()


def lambda_async(fn):
    async def predicate() -> bool:
        return fn()

    return predicate


# -- nodes in the test's own loop ---------------------------------------------------------------
@pytest.fixture
def servers(tmp_path):
    with (
        running_redis(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        yield redis, pg


@asynccontextmanager
async def running_node(redis, pg, **options):
    """A hub process's cluster side without its server: the node, its HubDocs and rooms."""
    node = ClusterNode(redis.url, pg.dsn, block_ms=200, **options)
    store = await node.open()
    docs = node.docs_class(store, EventLog(), sweep_interval=None)
    docs.load()
    rooms = node.rooms_for(docs, lambda *parts: b"".join(parts))
    docs.add_listener(rooms.on_update)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            nursery.start_soon(docs.run)
            yield node
            nursery.cancel_scope.cancel()
    finally:
        await node.aclose(drain=0)


def _keys(node: ClusterNode) -> set[str]:
    assert node.docs is not None
    doc = node.docs.get_doc(SPACE, DOC)
    return set(doc.get("m", type=Map).keys()) if doc is not None else set()


async def test_an_update_committed_after_the_stream_was_trimmed_reaches_a_room_opened_meanwhile(
    servers,
):
    """PostgreSQL holds a process's commits for longer than `commit_lag`; a compaction trims
    the stream meanwhile and another process opens the room then (PostgreSQL lacks the update,
    the stream too). Once committed, the update is appended again and reaches it."""
    redis, pg = servers
    lag = 1000
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg.dsn, autocommit=False))
    try:
        async with (
            running_node(redis, pg, commit_lag_ms=lag) as one,
            running_node(redis, pg, commit_lag_ms=lag) as two,
        ):
            await trio.to_thread.run_sync(
                lambda: blocker.execute("LOCK TABLE doc_updates IN EXCLUSIVE MODE")
            )
            sent = []
            for key in ("x1", "x2"):  # two clients: x2 does not wait for x1
                source = Doc()
                source.get("m", type=Map)[key] = 1
                sent.append(source.get_update())
            assert one.docs is not None
            one.docs.apply(SPACE, DOC, sent[0], "c1")
            await trio.sleep(0.05)
            one.docs.apply(SPACE, DOC, sent[1], "c1")
            room = room_of(SPACE, DOC)

            async def published() -> bool:
                return await one.bus.update_count(room) == 2

            await until(published, timeout=5)
            await trio.sleep(lag / 1000 + 0.3)  # both are older than the lag now
            await compact_room(one.bus, one.lock, one.docstore, SPACE, DOC, commit_lag_ms=lag)
            assert await one.bus.update_count(room) == 1  # x1 trimmed, not committed
            assert two.rooms is not None  # a client opens the room on `two`:
            assert (
                two.rooms.join(SPACE, DOC, YConn(1)) is None
            )  # PostgreSQL: nothing, the stream: x2

            async def has_x2() -> bool:
                return "x2" in _keys(two)

            await until(has_x2, timeout=5)
            assert "x1" not in _keys(two)
            await trio.to_thread.run_sync(blocker.rollback)  # the commit goes through

            async def has_both() -> bool:
                return _keys(two) == {"x1", "x2"}

            await until(has_both, timeout=10, what="x1 appended again after its commit")
            assert one.store.readded >= 2
    finally:
        await trio.to_thread.run_sync(blocker.rollback)
        blocker.close()


# -- watching a cluster process ------------------------------------------------------------------
def _metrics(hub) -> dict[str, float]:
    import urllib.request

    from peerdaemon.hub.metrics import parse

    with urllib.request.urlopen(f"http://127.0.0.1:{hub.port}/metrics", timeout=5) as response:
        samples = parse(response.read().decode())
    return {
        name + "".join(f"{{{v}}}" for _k, v in labels): v for (name, labels), v in samples.items()
    }


async def test_metrics_and_hub_status_show_the_cluster_and_its_servers(cluster):
    """`/metrics` of a cluster process has its part (servers reachable, rooms followed, queued
    commits, bus lag); `hub status` lists PostgreSQL's figures and every live process; Redis
    stopped shows in both."""
    (one, two), tokens, redis, pg = cluster
    a, b = Writer("a", tokens["alice"]), Writer("b", tokens["bob"])
    P = "peerdaemon_hub_cluster_"
    async with a.connected(one), b.connected(two):
        for _ in range(3):
            await a.edit()
        await until(lambda_async(lambda: b.keys() == a.sent), timeout=10)

        async def both_up() -> bool:
            m = await trio.to_thread.run_sync(_metrics, two)
            return m.get(P + "redis_up") == 1 and m.get(P + "postgres_up") == 1

        await until(both_up, timeout=10, what="the servers checked")
        m = await trio.to_thread.run_sync(_metrics, two)
        assert m[P + "rooms_followed"] >= 1
        assert m[P + "remote_updates_total"] >= 3  # a's edits, read from the bus
        assert m[P + "queued_commits"] == 0
        assert 0 <= m[P + "bus_lag_seconds"] < 5
        assert m[P + "read_restarts_total"] >= 1
        assert any(k.startswith(P + "info{") for k in m)
        assert m["peerdaemon_hub_store_commit_seconds_count"] >= 0

        async def both_listed() -> dict:
            status = json.loads(await trio.to_thread.run_sync(admin, one, "status", "--json"))
            clients = [p.get("clients") for p in status["cluster"]["processes"].values()]
            return status if clients == [1, 1] else {}  # (heartbeats are renewed each second)

        with trio.fail_after(15):
            while not (status := await both_listed()):
                await trio.sleep(0.2)
        assert status["running"] is True
        assert status["live"]["metrics"]["cluster_redis_up"] == 1
        assert status["cluster"]["postgres"]["reachable"] is True
        assert status["cluster"]["redis"]["reachable"] is True
        assert status["users"] == 2
        assert status["hub_key"]
        (space,) = [s for s in status["spaces"] if s["id"] == SPACE]
        assert space["documents"] >= 1 and space["owner"] == "alice"
        procs = status["cluster"]["processes"].values()
        assert {p["address"] for p in procs} == {
            f"ws://127.0.0.1:{one.port}",
            f"ws://127.0.0.1:{two.port}",
        }
        text = await trio.to_thread.run_sync(admin, one, "status")
        assert "processes alive: 2" in text and "redis: reachable" in text

        redis.stop()
        try:

            async def redis_down() -> bool:
                m = await trio.to_thread.run_sync(_metrics, one)
                return m.get(P + "redis_up") == 0

            await until(redis_down, timeout=15, what="redis seen down")
            status = json.loads(await trio.to_thread.run_sync(admin, one, "status", "--json"))
            assert status["cluster"]["redis"]["reachable"] is False
            assert status["cluster"]["postgres"]["reachable"] is True
        finally:
            redis.start()
