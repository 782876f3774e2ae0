"""DocStore (peerdaemon/hub/cluster/store.py) on a real PostgreSQL: the schema mirrors the
SQLite one, appends are group-committed in order, a compaction folds and deletes in one
transaction, and kill -9 of PostgreSQL in the middle of appends or of a compaction loses
nothing that was committed (and nothing queued)."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import trio
from pycrdt import Doc, Text
from servers import have_postgres, running_postgres

from peerdaemon.hub.accounts import _SCHEMA as ACCOUNTS_SCHEMA

psycopg = pytest.importorskip("psycopg")

from peerdaemon.hub.cluster.schema import SCHEMA_VERSION  # noqa: E402
from peerdaemon.hub.cluster.store import DocStore, DocStoreError, fold_updates  # noqa: E402

pytestmark = pytest.mark.skipif(not have_postgres(), reason="PostgreSQL is not installed")


@pytest.fixture
def pg():
    with running_postgres(fsync=False) as server:  # only processes die here, not the machine
        yield server


def edits(n, start=0):
    """`n` Yjs updates, each appending one character of a known text."""
    doc = Doc()
    text = doc.get("t", type=Text)
    out = []
    doc.observe(lambda event: out.append(event.update))
    for i in range(start, start + n):
        text += chr(ord("a") + i % 26)
    return out


def content(updates):
    doc = Doc()
    for u in updates:
        doc.apply_update(u)
    return str(doc.get("t", type=Text))


async def opened(dsn, nursery):
    store = DocStore(dsn, retry=0.05)
    await store.open()
    await nursery.start(store.run)
    return store


async def test_schema_migrates_once_mirrors_the_accounts_and_refuses_a_newer_one(pg):
    first = DocStore(pg.dsn)
    assert await first.open() == 0
    second = DocStore(pg.dsn)  # another hub process starting on the same database
    assert await second.open() == SCHEMA_VERSION

    def columns(conn):
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public'"
        ).fetchall()
        return {(t, c) for t, c in rows}

    have = await first.sql(columns)
    lite = sqlite3.connect(":memory:")
    lite.executescript(ACCOUNTS_SCHEMA)
    for (table,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in lite.execute(f"PRAGMA table_info({table})"):
            column = "user_name" if row[1] == "user" else row[1]  # `user` is reserved
            assert (table, column) in have, f"{table}.{row[1]} has no column in PostgreSQL"
    for needed in [("documents", "snapshot"), ("doc_updates", "blob"), ("settings", "value")]:
        assert needed in have

    # admin changes bump the version a hub process polls (PRAGMA data_version's stand-in)
    before = await first.accounts_version()
    await first.sql(
        lambda c: c.execute("INSERT INTO users VALUES ('alice', 'p1', 0), ('bob', 'p2', 0)")
    )
    assert await first.accounts_version() == before + 1

    await first.sql(lambda c: c.execute("INSERT INTO schema_version VALUES (%s)", (99,)))
    with pytest.raises(DocStoreError, match="newer than this hub"):
        await DocStore(pg.dsn).open()
    first.close()
    second.close()


async def test_appends_commit_in_order_and_load_reads_them_back(pg):
    updates = edits(300)
    async with trio.open_nursery() as nursery:
        store = await opened(pg.dsn, nursery)
        tickets = [store.append("s1", "env1", u, "p1:1") for u in updates]
        tickets.append(store.append("s1", "space:s1", b"\x00\x00", "p1:2"))
        for ticket in tickets:
            await ticket.wait()
        assert store.queued == 0 and store.commits < len(tickets)  # grouped
        loaded = await store.load("s1", "env1")
        assert loaded.updates == updates and loaded.rows == 300 and loaded.version == 0
        assert content(loaded.updates) == content(updates)
        assert await store.load("s1", "nothing") is None
        sizes = await store.sizes()
        assert sizes[("s1", "env1")] == sum(map(len, updates)) == loaded.size
        with pytest.raises(ValueError):
            store.append("s1/x", "env1", b"", "")
        await store.put_setting("identity", {"private_key": b"k" * 32})
        assert await store.get_setting("identity") == {"private_key": b"k" * 32}
        assert await store.get_setting("missing") is None
        nursery.cancel_scope.cancel()
    store.close()


async def test_compaction_folds_and_keeps_what_arrives_meanwhile(pg):
    first, later = edits(200), edits(50, start=200)
    async with trio.open_nursery() as nursery:
        store = await opened(pg.dsn, nursery)
        for u in first:
            store.append("s1", "env1", u)
        await store.append("s1", "env1", first[-1]).wait()

        folding = threading.Event()
        go_on = threading.Event()

        def slow_fold(updates):
            folding.set()
            go_on.wait(10)
            return fold_updates(updates)

        async def compact():
            nonlocal folded
            folded = await store.compact("s1", "env1", slow_fold)

        folded = None
        async with trio.open_nursery() as inner:
            inner.start_soon(compact)
            await trio.to_thread.run_sync(folding.wait)
            # appends go on while the compaction holds the document's row
            with trio.fail_after(10):
                for u in later:
                    await store.append("s1", "env1", u).wait()
            go_on.set()
        assert folded == 201
        loaded = await store.load("s1", "env1")
        assert loaded.version == 1 and loaded.rows == 50
        assert content(loaded.updates) == content(first + later)
        assert await store.compact("s1", "env1") == 50
        again = await store.load("s1", "env1")
        assert again.rows == 0 and len(again.updates) == 1
        assert content(again.updates) == content(first + later)
        assert again.size < sum(map(len, first + later))
        assert await store.compact("s1", "env1") == 0
        nursery.cancel_scope.cancel()
    store.close()


async def test_postgres_kill9_in_the_middle_of_appends_loses_nothing(pg):
    updates = edits(400)
    async with trio.open_nursery() as nursery:
        store = await opened(pg.dsn, nursery)
        for u in updates[:100]:
            store.append("s1", "env1", u)
        await store.append("s1", "env1", updates[99]).wait()  # committed before the kill

        killed = trio.Event()

        async def writer():
            for i, u in enumerate(updates[100:]):
                store.append("s1", "env1", u)
                if i == 150:
                    await trio.to_thread.run_sync(pg.kill9)
                    killed.set()
                await trio.sleep(0)

        with trio.fail_after(60):
            async with trio.open_nursery() as inner:
                inner.start_soon(writer)
                await killed.wait()
                await trio.sleep(0.3)  # the writer finds PostgreSQL gone and waits
                assert store.queued > 0
                await trio.to_thread.run_sync(pg.start)
            last = store.append("s1", "env1", updates[-1])
            await last.wait()
        assert store.failures > 0 and store.queued == 0
        loaded = await store.load("s1", "env1")
        assert content(loaded.updates) == content(updates)
        nursery.cancel_scope.cancel()
    store.close()


async def test_postgres_kill9_during_a_compaction_keeps_the_rows(pg):
    updates = edits(120)
    async with trio.open_nursery() as nursery:
        store = await opened(pg.dsn, nursery)
        for u in updates:
            store.append("s1", "env1", u)
        await store.append("s1", "env1", updates[-1]).wait()
        folding = threading.Event()

        def fold_then_die(parts):
            folding.set()
            pg.kill9()  # the transaction is open: nothing of it may stay
            return fold_updates(parts)

        with pytest.raises(DocStoreError):
            await store.compact("s1", "env1", fold_then_die)
        assert folding.is_set()
        await trio.to_thread.run_sync(pg.start)
        loaded = await store.load("s1", "env1")
        assert loaded.version == 0 and loaded.rows == 121
        assert content(loaded.updates) == content(updates)
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_cancelled_query_ends_at_once_and_the_connection_goes_on(pg):
    store = DocStore(pg.dsn)
    await store.open()
    with trio.fail_after(3):  # pg_sleep(30) would outlast it: the query is cancelled
        with trio.move_on_after(0.2) as scope:
            await store.sql(lambda c: c.execute("SELECT pg_sleep(30)"))
    assert scope.cancelled_caught
    with trio.fail_after(10):
        assert await store.sql(lambda c: c.execute("SELECT 41 + 1").fetchone()) == (42,)
    store.close()


async def test_a_row_that_commits_after_a_later_one_survives_a_compaction(pg):
    """Two processes: one's insert holds a smaller seq and commits after the other's larger
    one, and after a compaction folded the larger; the load still brings it back."""
    early, late = edits(2)
    async with trio.open_nursery() as nursery:
        store = await opened(pg.dsn, nursery)
        await store.append("s1", "env1", b"\x00\x00").wait()  # the document exists
        slow = await trio.to_thread.run_sync(psycopg.connect, pg.dsn)
        try:
            slow.execute(  # process 1: its transaction is open, its seq taken
                "INSERT INTO doc_updates (space, doc, blob) VALUES ('s1', 'env1', %s)", (early,)
            )
            await store.append("s1", "env1", late).wait()  # process 2: a larger seq, committed
            assert await store.compact("s1", "env1") == 2
            await trio.to_thread.run_sync(slow.commit)
        finally:
            slow.close()
        loaded = await store.load("s1", "env1")
        assert loaded.rows == 1 and content(loaded.updates) == content([early, late])
        seqs = await store.sql(lambda c: c.execute("SELECT seq FROM doc_updates").fetchall())
        assert len(seqs) == 1
        nursery.cancel_scope.cancel()
    store.close()


def test_fold_collects_garbage_but_never_drops_an_update_waiting_for_another():
    doc = Doc()
    text = doc.get("t", type=Text)
    log = []
    doc.observe(lambda event: log.append(event.update))
    text += "hello world" * 50
    del text[0:500]
    folded = fold_updates(log)
    assert content([folded]) == content(log) and len(folded) < len(b"".join(log)) / 4
    a, b = edits(2)
    waiting = fold_updates([b])  # `b` needs `a`, which is not committed yet
    assert content([waiting, a]) == "ab"
