"""Limits across a cluster (issue 14, docs/hub-cluster.md "Limits across the cluster"): two hub
processes of one cluster (`serve_hub` in scaled mode, in this test process, each with its own
node, PostgreSQL connections, Redis clients and confined mock runner) on a private Redis and
PostgreSQL.

- `envs_per_space`: clients creating environments in one space at once on both processes end
  with exactly the limit stored, on both and in PostgreSQL; the reservations under it are
  atomic between real concurrent connections, count what was stored before them, give back
  what was not used, and a PostgreSQL away falls back to what a process knows.
- Hosted mocks: every process serves every hosted mock; `hosted_mocks` picks the same mocks
  on both, and `mock_rps` spent on one process is spent on the other."""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import asynccontextmanager

import pytest
import trio
from helpers import SPACE, YClient, client, running_hub, url
from servers import have_postgres, have_redis, running_postgres, running_redis

from peerdaemon.hub.ywebsocket import sync_update

pytestmark = pytest.mark.skipif(
    not (have_redis() and have_postgres()), reason="needs redis-server and PostgreSQL"
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402
from mockutil import require_runner, small_env  # noqa: E402
from pycrdt import Doc, Map  # noqa: E402
from test_cluster_hub import Hub  # noqa: E402
from test_hub_cloudmock import Hosted, echo_env, http, served  # noqa: E402
from test_hub_server import expect_denied  # noqa: E402
from trio_websocket import ConnectionClosed, open_websocket_url  # noqa: E402

from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.mocks import owner_ranking  # noqa: E402
from peerdaemon.hub.cluster.schema import MIGRATIONS  # noqa: E402
from peerdaemon.hub.cluster.store import (  # noqa: E402
    env_reservations,
    migrate,
    release_env,
    reserve_env,
)
from peerdaemon.hub.docs import LimitExceeded, StoreUnavailable  # noqa: E402
from peerdaemon.model import import_environment  # noqa: E402

OTHER = "team2"


@pytest.fixture
def runner(monkeypatch):
    return require_runner(monkeypatch)


@pytest.fixture
def servers(tmp_path):
    with (
        running_redis(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        with ClusterAccounts.open_pg(pg.dsn) as accounts:
            accounts.add_user("alice")
            accounts.create_space(SPACE, "alice", "Team")
            accounts.create_space(OTHER, "alice", "Other team")
        yield redis, pg


@asynccontextmanager
async def cluster(tmp_path, redis, pg):
    async with (
        running_hub(tmp_path / "hub1", redis=redis.url, postgres=pg.dsn) as one,
        running_hub(tmp_path / "hub2", redis=redis.url, postgres=pg.dsn) as two,
    ):
        yield one, two


def set_limits(dsn: str, **limits: int) -> None:
    with ClusterAccounts.open_pg(dsn) as admin:
        for key, value in limits.items():
            admin.set_limit(key, value, user="alice")


async def until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


def test_owner_ranking_is_first_turned_on_then_by_key():
    wanted = {
        "s2": {"e1": {"at": 5.0}, "e0": {"at": 5.0}},
        "s1": {"e9": {"at": 1.0}, "e2": {"at": None}},
    }
    assert owner_ranking(wanted) == ["s1/e2", "s1/e9", "s2/e0", "s2/e1"]


async def test_hosted_mocks_choose_the_same_mocks_on_every_process(servers, tmp_path, runner):
    """alice may host one mock. Y (space 2) was turned on first but reaches the cluster through
    process 2 after process 1 already serves X (space 1): both processes serve Y and refuse X,
    whichever order they learnt them in."""
    redis, pg = servers
    set_limits(pg.dsn, hosted_mocks=1)
    async with cluster(tmp_path, redis, pg) as (one, two):
        first = Hosted(one, OTHER)
        second = Hosted(one, SPACE)
        # Y's setting is written (its `at`) before X's, but pushed later, through process 2
        y_env = small_env("Y")
        second.server = two
        y_doc_before = second.space_doc.doc.get_state()
        second.space_doc.set_state(y_env["uuid"], "shared", "TESTDEV")
        second.space_doc.set_mock(y_env["uuid"], True, "public", "t", "TESTDEV")
        await trio.sleep(0.01)  # a later `at` for X
        x = first.add(echo_env())

        async def x_served_on(server) -> bool:
            return server.mocks.lookup(OTHER, x) is not None

        await until(lambda: x_served_on(one))
        await until(lambda: x_served_on(two))  # process 2 follows space documents it never saw
        # now Y arrives, through process 2
        doc, _stored, _ = import_environment(y_env, y_env["uuid"])
        two.docs.apply(SPACE, y_env["uuid"], doc.get_update(), "test")
        second._push_space(y_doc_before)
        y = y_env["uuid"]

        async def settled(server) -> bool:
            return (
                server.mocks.lookup(SPACE, y) is not None and server.mocks.lookup(OTHER, x) is None
            )

        await until(lambda: settled(one))
        await until(lambda: settled(two))
        for server in (one, two):
            [refused] = [m for m in server.mocks.describe() if m["env"] == x]
            assert refused["state"] == "refused" and "at most 1" in refused["reason"]
            assert (await http(server, f"/mock/{OTHER}/{x}/hello"))[0] == 404
        await until(lambda: served(two, f"/mock/{SPACE}/{y}/hello", b"hello v1"))
        await until(lambda: served(one, f"/mock/{SPACE}/{y}/hello", b"hello v1"))


async def test_mock_rps_spent_on_one_process_is_spent_on_the_other(servers, tmp_path, runner):
    redis, pg = servers
    set_limits(pg.dsn, mock_rps=3)
    async with cluster(tmp_path, redis, pg) as (one, two):
        hosted = Hosted(one)
        env = hosted.add(echo_env())
        path = hosted.path(env, "hello")
        await until(lambda: served(one, path, b"hello v1"))
        await until(lambda: served(two, path, b"hello v1"))  # every process serves it
        await trio.sleep(1.1)  # both buckets and the shared window full again
        for _attempt in range(5):
            statuses = []
            for _ in range(10):  # spend the window on process 1
                statuses.append((await http(one, path))[0])
                if statuses[-1] == 429:
                    break
            assert statuses.count(200) <= 3
            status, headers, _ = await http(two, path)
            if status == 429:  # process 2's own bucket is full: the cluster's window said no
                assert headers["retry-after"] == "1"
                assert two.mocks.shared_refusals >= 1
                return
            await trio.sleep(1.1)  # the window rolled over between the two: again
        raise AssertionError("process 2 never refused a request once process 1 spent the rate")


# -- envs_per_space ---------------------------------------------------------------------------

LIMIT = 4


def _env_docs(conn, table: str) -> set[str]:
    rows = conn.execute(
        f"SELECT doc FROM {table} WHERE space = %s"  # noqa: S608
        " AND doc NOT LIKE 'space:%%' AND doc NOT LIKE 'files:%%'",
        (SPACE,),
    ).fetchall()
    return {r[0] for r in rows}


async def _async(value: bool) -> bool:
    return value


async def in_postgres(dsn: str) -> tuple[set[str], set[str]]:
    """(the space's environments stored, those holding a place)."""

    def read() -> tuple[set[str], set[str]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return _env_docs(conn, "documents"), env_reservations(conn, SPACE)

    return await trio.to_thread.run_sync(read)


@pytest.fixture
def token(servers):
    """alice's (she owns SPACE; every client of hers is one device, so one device slot)."""
    _redis, pg = servers
    with ClusterAccounts.open_pg(pg.dsn) as accounts:
        return accounts.add_token("alice")


def new_env(name: str) -> bytes:
    doc = Doc()
    doc.get("m", type=Map)["name"] = name
    return doc.get_update()


async def create(server, doc_id: str, token: str, go: trio.Event, outcome: dict) -> None:
    """A y-websocket client creating `doc_id` once `go` is set: `outcome[doc_id]` is "synced"
    once it may, then "open" while the hub keeps the connection, or the close code it sent
    (4422: quota-exceeded)."""
    async with open_websocket_url(url(server, SPACE, doc_id, token, device="tests")) as ws:
        client = YClient(ws)
        await client.sync()
        outcome[doc_id] = "synced"
        await go.wait()
        await ws.send_message(sync_update(new_env(doc_id)))
        outcome[doc_id] = "open"
        try:
            while True:
                await client.recv()
        except ConnectionClosed as exc:
            outcome[doc_id] = exc.reason.code


async def test_envs_per_space_is_atomic_across_processes(servers, tmp_path, token):
    """12 clients create an environment each at the same moment, 6 on each process, in a space
    that may hold 4: exactly 4 are stored, in PostgreSQL and on both processes, and the
    others were refused with quota-exceeded. (Counting PostgreSQL's documents, as before the
    reservations, let each process pass: the others' were still in their writers' queues.)"""
    redis, pg = servers
    set_limits(pg.dsn, envs_per_space=LIMIT)
    async with cluster(tmp_path, redis, pg) as (one, two):
        ids = [f"env{i:02}" for i in range(12)]
        outcome: dict[str, object] = {}
        go = trio.Event()
        async with trio.open_nursery() as nursery:
            for i, doc_id in enumerate(ids):
                nursery.start_soon(create, (one, two)[i % 2], doc_id, token, go, outcome)
            await until(lambda: _async(len(outcome) == len(ids)))  # every client synced
            go.set()

            async def settled() -> bool:
                refused = [d for d in ids if isinstance(outcome[d], int)]
                stored, _ = await in_postgres(pg.dsn)
                return len(refused) + len(stored) >= len(ids)

            await until(settled)
            await trio.sleep(0.3)  # nothing more comes
            nursery.cancel_scope.cancel()
        stored, reserved = await in_postgres(pg.dsn)
        accepted = {d for d in ids if outcome[d] == "open"}
        refused = set(ids) - accepted
        assert len(stored) == LIMIT, (stored, outcome)
        assert stored == reserved == accepted
        assert {outcome[d] for d in refused} == {4422}  # quota-exceeded
        for server in (one, two):
            events = server.events.since(0)
            reasons = [e["data"]["reason"] for e in events if e["type"] == "limit-exceeded"]
            assert set(reasons) <= {"quota-exceeded"}
            for doc_id in sorted(accepted):  # every process serves the 4 (loaded from PostgreSQL)
                async with client(server, SPACE, doc_id, token, device="tests") as c:
                    assert c.map() == {"name": doc_id}
                assert server.docs.has(SPACE, doc_id)
            for doc_id in sorted(refused):
                assert not server.docs.has(SPACE, doc_id)
            # the space is full on both: one more is refused whichever process it reaches
            with pytest.raises(LimitExceeded, match="holds 4 environment"):
                server.docs.apply(SPACE, "late", new_env("late"), "test")


@pytest.fixture
def pg_only():
    with running_postgres(fsync=False) as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        yield pg


def test_reservations_are_atomic_between_concurrent_connections(pg_only):
    """8 connections (as 8 processes would) reserve 5 new environments each at once in a space
    that has room for 10 more: exactly 10 places are taken. One of them is never refused
    again, even in the full space; one given back lets one more in. (The space holds many
    already, so each count takes long enough for the connections to meet in it.)"""
    base = 100_000
    with psycopg.connect(pg_only.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO env_reservations (space, doc)"
            " SELECT %s, 'old' || g FROM generate_series(1, %s) g",
            (SPACE, base),
        )
    limit = base + 10
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool, int]] = []

    def process(n: int) -> None:
        with psycopg.connect(pg_only.dsn, autocommit=True) as conn:
            barrier.wait()
            for i in range(5):
                doc = f"p{n}e{i}"
                results.append((doc, *reserve_env(conn, SPACE, doc, limit)))

    threads = [threading.Thread(target=process, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and max(held for _, _, held in results) == limit
    taken = {doc for doc, reserved, _ in results if reserved}
    with psycopg.connect(pg_only.dsn, autocommit=True) as conn:
        assert len(taken) == 10 and env_reservations(conn, SPACE) >= taken
        assert len(env_reservations(conn, SPACE)) == limit
        one = sorted(taken)[0]
        assert reserve_env(conn, SPACE, one, limit) == (True, limit)  # it has its place
        assert reserve_env(conn, SPACE, "more", limit) == (False, limit)
        assert reserve_env(conn, SPACE, "more", limit, known=0) == (False, limit)
        assert reserve_env(conn, OTHER, "elsewhere", 10) == (True, 1)  # per space
        # `one` was reserved twice (as by two processes): given back twice before it is free
        release_env(conn, SPACE, one)
        assert one in env_reservations(conn, SPACE)
        release_env(conn, SPACE, one)
        assert one not in env_reservations(conn, SPACE)
        assert reserve_env(conn, SPACE, "more", limit) == (True, limit)
        # what the caller counts itself (documents it created while PostgreSQL was away)
        assert reserve_env(conn, OTHER, "e2", 10, known=10) == (False, 1)


def test_stored_environments_hold_places_and_old_unused_ones_are_given_back(pg_only):
    """Every stored environment holds a place however it was stored (no reservation first:
    created while PostgreSQL was away), its deletion frees it; a place never used (its
    process died before the first commit) is given back once it is old and the space full."""
    with psycopg.connect(pg_only.dsn, autocommit=True) as conn:
        for doc in ("a", "space:" + SPACE, "files:a"):
            conn.execute("INSERT INTO documents (space, doc) VALUES (%s, %s)", (SPACE, doc))
        assert env_reservations(conn, SPACE) == {"a"}
        assert reserve_env(conn, SPACE, "b", 3) == (True, 2)
        release_env(conn, SPACE, "a")  # stored: kept
        assert env_reservations(conn, SPACE) == {"a", "b"}
        conn.execute("DELETE FROM documents WHERE space = %s AND doc = 'a'", (SPACE,))
        assert env_reservations(conn, SPACE) == {"b"}
        assert reserve_env(conn, SPACE, "c", 2) == (True, 2)
        conn.execute(
            "UPDATE env_reservations SET created = now() - interval '1 hour' WHERE doc = 'b'"
        )
        assert reserve_env(conn, SPACE, "d", 2, grace=7200) == (False, 2)  # not old enough
        assert reserve_env(conn, SPACE, "d", 2) == (True, 2)  # b was never stored: given back
        assert env_reservations(conn, SPACE) == {"c", "d"}


def test_migration_counts_the_documents_stored_before(tmp_path):
    """A database of schema 1 (before the reservations) with documents: after the migration
    every stored environment holds its place, space documents and files do not."""
    with running_postgres(fsync=False) as pg, psycopg.connect(pg.dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            conn.execute(MIGRATIONS[1].encode())
            conn.execute("INSERT INTO schema_version VALUES (1)")
        for space, doc in [(SPACE, "a"), (SPACE, "b"), (SPACE, "space:" + SPACE), (OTHER, "c")]:
            conn.execute("INSERT INTO documents (space, doc) VALUES (%s, %s)", (space, doc))
        conn.execute("INSERT INTO documents (space, doc) VALUES (%s, 'files:a')", (SPACE,))
        assert migrate(conn) == 1
        assert env_reservations(conn, SPACE) == {"a", "b"}
        assert env_reservations(conn, OTHER) == {"c"}
        assert reserve_env(conn, SPACE, "new", 2) == (False, 2)


async def test_a_creation_that_creates_nothing_gives_its_place_back(servers, tmp_path):
    """A new environment's first update that is not a Yjs update, changes nothing, or is
    refused for its size takes no place: the space that may hold one still takes one."""
    redis, pg = servers
    set_limits(pg.dsn, envs_per_space=1, bytes_per_env=1000)
    async with running_hub(tmp_path / "hub1", redis=redis.url, postgres=pg.dsn) as one:
        with pytest.raises(ValueError, match="not a Yjs update"):
            one.docs.apply(SPACE, "garbage", b"\xff\xfe\xfd", "test")
        assert one.docs.apply(SPACE, "empty", b"\x00\x00", "test") is None
        with pytest.raises(LimitExceeded, match="would hold"):
            one.docs.apply(SPACE, "large", new_env("x" * 2000), "test")
        assert (await in_postgres(pg.dsn))[1] == set()
        await one.docs.apply(SPACE, "env", new_env("env"), "test").wait()
        assert await in_postgres(pg.dsn) == ({"env"}, {"env"})
        with pytest.raises(LimitExceeded, match="holds 1 environment"):
            one.docs.apply(SPACE, "second", new_env("second"), "test")
        one.docs.apply(SPACE, "env", new_env("more"), "test")  # it has its place
        one.docs.apply(SPACE, "space:" + SPACE, new_env("s"), "test")  # not an environment
        one.docs.apply(SPACE, "files:env", new_env("f"), "test")


async def test_while_postgresql_is_away_a_process_counts_what_it_knows(servers, tmp_path):
    """PostgreSQL down: a process creates environments up to the limit by its own count
    (nothing it relayed is taken back, nothing is lost); once PostgreSQL is back they are
    stored and hold their places, so the other process refuses the next one."""
    redis, pg = servers
    set_limits(pg.dsn, envs_per_space=2)
    async with cluster(tmp_path, redis, pg) as (one, two):
        await trio.to_thread.run_sync(pg.kill9)
        try:
            one.docs.apply(SPACE, "a", new_env("a"), "test")
            one.docs.apply(SPACE, "b", new_env("b"), "test")
            with pytest.raises(LimitExceeded, match="holds 2 environment"):
                one.docs.apply(SPACE, "c", new_env("c"), "test")
        finally:
            await trio.to_thread.run_sync(pg.start)

        async def stored() -> bool:
            return await in_postgres(pg.dsn) == ({"a", "b"}, {"a", "b"})

        await until(stored)
        with pytest.raises(LimitExceeded, match="holds 2 environment"):
            two.docs.apply(SPACE, "d", new_env("d"), "test")


async def test_a_postgresql_that_hangs_stalls_no_process(servers, tmp_path, token):
    """PostgreSQL stopped (SIGSTOP: its connections stay open and nothing answers, as when a
    network drops packets): a creation waits for its reservation at most `RESERVE_TIMEOUT`
    once, then counts what the process knows, and asks no more while that call is stuck; a
    last-resort load in the event loop fails within its bound; an accounts change fails within
    its bound; an unknown token is refused after the second its re-read may take; a room keeps
    relaying between its clients meanwhile. Resumed, what was created is stored and holds its
    places. (Without the bounds the event loop waits for the server: 10 s here, when a timer
    resumes it.)"""
    redis, pg = servers
    set_limits(pg.dsn, envs_per_space=3)
    # no accounts poll: the read before a refusal is the one that meets the hung server
    options = {"redis": redis.url, "postgres": pg.dsn, "accounts_poll": 3600.0}
    async with running_hub(tmp_path / "hub1", **options) as one:
        await one.docs.apply(SPACE, "a", new_env("a"), "test").wait()
        async with (
            client(one, SPACE, "a", token, device="d") as c1,
            client(one, SPACE, "a", token, device="d") as c2,
        ):
            await trio.to_thread.run_sync(pg.pause)
            timer = threading.Timer(10.0, pg.resume)
            timer.start()
            try:
                started = time.monotonic()
                one.docs.apply(SPACE, "b", new_env("b"), "test")
                first = time.monotonic() - started
                with pytest.raises(StoreUnavailable):
                    one.store.updates_of(f"{OTHER}/never-read")
                await trio.sleep(one.docs.RETRY_AFTER + 0.1)  # asked again: the call is stuck
                started = time.monotonic()
                one.docs.apply(SPACE, "c", new_env("c"), "test")
                again = time.monotonic() - started
                with pytest.raises(LimitExceeded, match="holds 3 environment"):
                    one.docs.apply(SPACE, "d", new_env("d"), "test")
                assert first < 5.0 and again < 0.4, (first, again)
                started = time.monotonic()  # an accounts change (a space a daemon creates)
                with pytest.raises(sqlite3.OperationalError, match="no answer"):
                    one.accounts.create_space("team3", "alice", "While hung")
                with pytest.raises(sqlite3.OperationalError, match="not returned"):
                    one.accounts.create_space("team4", "alice", "While hung")
                assert time.monotonic() - started < 5.0
                with trio.fail_after(5):  # read again before the refusal: for a second at most
                    await expect_denied(one, SPACE, "a", "wrong-token", "unauthorized", 4401)
                await c1.edit("while", "hung")
                await c2.wait_for(lambda: c2.map().get("while") == "hung")
            finally:
                timer.cancel()
                await trio.to_thread.run_sync(pg.resume)

        async def stored() -> bool:
            return await in_postgres(pg.dsn) == ({"a", "b", "c"}, {"a", "b", "c"})

        await until(stored)
        await until(lambda: _async(not one.accounts._pushes.stuck))
        one.accounts.create_space("team4", "alice", "After")
        with ClusterAccounts.open_pg(pg.dsn) as admin:
            assert "team4" in {space["id"] for space in admin.spaces()}


async def test_envs_per_space_holds_between_real_hub_processes(servers, tmp_path, token):
    """The same race between two `peerdaemon hub serve` processes, whose reservations meet in
    PostgreSQL truly at once: 16 clients, 8 on each, a space that may hold 5."""
    redis, pg = servers
    set_limits(pg.dsn, envs_per_space=5)
    hubs = [Hub(f"hub{i}", tmp_path / f"hub{i}", redis.url, pg.dsn) for i in range(2)]
    try:
        for hub in hubs:
            await trio.to_thread.run_sync(hub.start)
        ids = [f"env{i:02}" for i in range(16)]
        outcome: dict[str, object] = {}
        go = trio.Event()
        async with trio.open_nursery() as nursery:
            for i, doc_id in enumerate(ids):
                nursery.start_soon(create, hubs[i % 2], doc_id, token, go, outcome)
            await until(lambda: _async(len(outcome) == len(ids)))
            go.set()

            async def settled() -> bool:
                refused = [d for d in ids if isinstance(outcome[d], int)]
                stored, _ = await in_postgres(pg.dsn)
                return len(refused) + len(stored) >= len(ids)

            await until(settled)
            await trio.sleep(0.3)  # nothing more comes
            nursery.cancel_scope.cancel()
        stored, reserved = await in_postgres(pg.dsn)
        accepted = {d for d in ids if outcome[d] == "open"}
        assert len(stored) == 5, (stored, outcome, hubs[0].tail(), hubs[1].tail())
        assert stored == reserved == accepted
        assert {outcome[d] for d in set(ids) - accepted} == {4422}
        for hub in hubs:
            for doc_id in ids:
                async with client(hub, SPACE, doc_id, token, device="tests") as c:
                    assert c.map() == ({"name": doc_id} if doc_id in accepted else {})
            late: dict[str, object] = {}
            done = trio.Event()
            done.set()
            with trio.fail_after(10):
                await create(hub, f"late-{hub.name}", token, done, late)
            assert late == {f"late-{hub.name}": 4422}
    finally:
        for hub in hubs:
            await trio.to_thread.run_sync(hub.stop)
