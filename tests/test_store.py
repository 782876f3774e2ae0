"""Tests of peerdaemon.store: durability, ordering, group commit, compaction, lock."""

from __future__ import annotations

import hashlib
import os
import queue
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import cbor2
import pytest
import trio
from daemonproc import ROOT_FOR_MOUNTS, small_disk
from trio.testing import wait_all_tasks_blocked

from peerdaemon.store import (
    DB_NAME,
    SCHEMA_VERSION,
    LoadedEnv,
    Store,
    StoreError,
    StoreLockedError,
    Ticket,
)

HERE = Path(__file__).resolve().parent
CRASH_CHILD = HERE / "store_crash_child.py"
TIMEOUT = float(os.environ.get("STORE_TEST_TIMEOUT", "60"))


def rand_update(rng: random.Random, lo: int = 1, hi: int = 2048) -> bytes:
    return os.urandom(rng.randint(lo, hi))


async def wait_all(tickets: list[Ticket]) -> None:
    for t in tickets:
        await t.wait()


def reopen_load(data_dir: Path) -> dict[str, LoadedEnv]:
    with Store.open(data_dir) as s:
        return s.load()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# ---------------------------------------------------------------------------- basics


async def test_round_trip_across_reopen(data_dir: Path) -> None:
    rng = random.Random(1)
    expected: dict[str, list[bytes]] = {"a": [], "b": []}
    store = Store.open(data_dir)
    assert store.load() == {}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        tickets = []
        for i in range(200):
            env = "a" if i % 3 else "b"
            update = rand_update(rng)
            expected[env].append(update)
            tickets.append(store.enqueue_append(env, update))
        tickets.append(store.enqueue_meta("a", {"name": "Env A", "port": 3000}))
        await wait_all(tickets)
        nursery.cancel_scope.cancel()
    store.close()

    loaded = reopen_load(data_dir)
    assert set(loaded) == {"a", "b"}
    assert loaded["a"].updates == expected["a"]
    assert loaded["b"].updates == expected["b"]
    assert loaded["a"].meta == {"name": "Env A", "port": 3000}
    assert loaded["b"].meta == {}


async def test_data_dir_mode_wal_full_and_schema_version(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        other = sqlite3.connect(data_dir / DB_NAME)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master")}
            assert {"log", "snapshots", "env_meta", "settings"} <= tables
        finally:
            other.close()


async def test_order_is_enqueue_order_across_batches(data_dir: Path) -> None:
    """Interleaved appends of several envs, including empty updates, from many tasks; each
    env's log comes back in exactly the order enqueue_append was called."""
    rng = random.Random(2)
    expected: dict[str, list[bytes]] = {}
    with Store.open(data_dir) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)

            async def writer(seed: int) -> None:
                r = random.Random(seed)
                for _ in range(50):
                    env = f"env{r.randrange(4)}"
                    update = rand_update(rng, 0, 300)
                    expected.setdefault(env, []).append(update)
                    ticket = store.enqueue_append(env, update)
                    if r.random() < 0.5:
                        await ticket.wait()
                    else:
                        await trio.sleep(0)

            async with trio.open_nursery() as writers:
                for seed in range(20):
                    writers.start_soon(writer, seed)
            nursery.cancel_scope.cancel()
    loaded = reopen_load(data_dir)
    assert {k: v.updates for k, v in loaded.items()} == expected


async def test_ticket_awaited_by_many_and_after_completion(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            ticket = store.enqueue_append("a", os.urandom(10))
            assert not ticket.done
            assert ticket.seq is not None
            woken = []

            async def waiter(i: int) -> None:
                await ticket.wait()
                woken.append(i)

            async with trio.open_nursery() as waiters:
                for i in range(5):
                    waiters.start_soon(waiter, i)
            assert sorted(woken) == list(range(5))
            assert ticket.done and not ticket.failed
            await ticket.wait()  # again, after completion
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- group commit


async def test_group_commit_batches_concurrent_writers(data_dir: Path) -> None:
    """50 tasks each append-and-wait 20 times: if every write were its own transaction there
    would be 1000 commits; group commit folds the writes queued during one commit into the next."""
    rng = random.Random(3)
    with Store.open(data_dir) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)

            async def writer(i: int) -> None:
                for _ in range(20):
                    await store.enqueue_append(f"env{i % 7}", rand_update(rng, 1, 500)).wait()

            async with trio.open_nursery() as writers:
                for i in range(50):
                    writers.start_soon(writer, i)
            stats = store.stats()
            nursery.cancel_scope.cancel()
    assert stats["batched_writes"] == 1000
    assert stats["log_rows"] == 1000
    assert stats["failed_writes"] == 0
    assert stats["commits"] <= 1000 // 5, stats
    assert stats["environments"] == 7
    assert stats["db_bytes"] > stats["log_bytes"] > 0


async def test_enqueue_does_not_wait_for_commit(data_dir: Path) -> None:
    """Enqueueing is synchronous: thousands of writes queue up while nothing commits, and the
    writer then takes them in a few bounded batches."""
    with Store.open(data_dir) as store:
        tickets = [store.enqueue_append("a", os.urandom(64)) for _ in range(5000)]
        assert store.stats()["queued"] == 5000
        assert store.stats()["commits"] == 0
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await wait_all(tickets)
            stats = store.stats()
            nursery.cancel_scope.cancel()
    assert stats["batched_writes"] == 5000
    assert 1 < stats["commits"] <= 5  # bounded batches (MAX_BATCH_OPS), but few of them


# ---------------------------------------------------------------------------- compaction


def decode_state(updates: list[bytes]) -> list[bytes]:
    """Test model: a snapshot is b"S" + CBOR list of all updates it covers; updates are b"U"+..."""
    state: list[bytes] = []
    for i, u in enumerate(updates):
        if u[:1] == b"S":
            assert i == 0, "a snapshot must come first"
            state = cbor2.loads(u[1:])
        else:
            state.append(u)
    return state


async def test_needs_compaction_counts_enqueued_rows(data_dir: Path) -> None:
    with Store.open(data_dir, compact_count=10) as store:
        for _ in range(9):
            store.enqueue_append("a", os.urandom(5))
        assert not store.needs_compaction("a")
        store.enqueue_append("a", os.urandom(5))
        # nothing committed yet (no writer running), the threshold still trips
        assert store.stats()["commits"] == 0
        assert store.needs_compaction("a")
        assert not store.needs_compaction("other")
        store.enqueue_compact("a", b"snapshot")
        assert not store.needs_compaction("a")
        assert store.env_stats("a")["rows_since_snapshot"] == 0


async def test_compaction_by_count_keeps_later_appends(data_dir: Path) -> None:
    rng = random.Random(4)
    with Store.open(data_dir, compact_count=10) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            state: list[bytes] = []
            # first half committed before the compact request, second half in its batch
            for _ in range(5):
                u = b"U" + rand_update(rng)
                state.append(u)
                await store.enqueue_append("a", u).wait()
            for _ in range(5):
                u = b"U" + rand_update(rng)
                state.append(u)
                store.enqueue_append("a", u)
            other = store.enqueue_append("b", b"U" + rand_update(rng))
            assert store.needs_compaction("a")
            compact = store.enqueue_compact("a", b"S" + cbor2.dumps(state))
            late = b"U" + rand_update(rng)  # enqueued after the request: must survive
            store.enqueue_append("a", late)
            state.append(late)
            await compact.wait()
            await other.wait()
            later = b"U" + rand_update(rng)
            await store.enqueue_append("a", later).wait()
            state.append(later)
            es = store.env_stats("a")
            nursery.cancel_scope.cancel()
    assert es["log_rows"] == 2
    assert es["snapshot_bytes"] > 0
    loaded = reopen_load(data_dir)
    assert loaded["a"].updates[1:] == [late, later]
    assert decode_state(loaded["a"].updates) == state
    assert len(loaded["b"].updates) == 1  # other envs untouched


async def test_compaction_by_bytes(data_dir: Path) -> None:
    with Store.open(data_dir, compact_count=10_000, compact_bytes=1000) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            a, b, c = os.urandom(400), os.urandom(400), os.urandom(400)
            store.enqueue_append("a", a)
            store.enqueue_append("a", b)
            assert not store.needs_compaction("a")
            store.enqueue_append("a", c)
            assert store.needs_compaction("a")
            assert store.env_stats("a")["bytes_since_snapshot"] == 1200
            await store.enqueue_compact("a", b"SNAP").wait()
            assert not store.needs_compaction("a")
            st = store.stats()
            nursery.cancel_scope.cancel()
    assert st["log_rows"] == 0 and st["log_bytes"] == 0 and st["snapshot_bytes"] == 4
    assert reopen_load(data_dir)["a"].updates == [b"SNAP"]


async def test_compaction_under_sustained_load(data_dir: Path) -> None:
    """Writers never stop, yet compactions are requested as thresholds trip and commit while
    the writers are still going; the log stays bounded and the rebuilt state is exact."""
    rng = random.Random(5)
    compact_count = 40
    state: dict[str, list[bytes]] = {"a": [], "b": []}
    compactions: list[Ticket] = []
    committed_during_load: list[bool] = []
    with Store.open(data_dir, compact_count=compact_count) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)

            async def writer(seed: int) -> None:
                r = random.Random(seed)
                for _ in range(300):
                    env = r.choice("ab")
                    u = b"U" + rand_update(rng, 1, 200)
                    state[env].append(u)
                    ticket = store.enqueue_append(env, u)
                    if store.needs_compaction(env):
                        compactions.append(
                            store.enqueue_compact(env, b"S" + cbor2.dumps(state[env]))
                        )
                    await ticket.wait()
                committed_during_load.append(sum(t.done for t in compactions) >= 2)

            async with trio.open_nursery() as writers:
                for seed in range(8):
                    writers.start_soon(writer, seed)
            await wait_all(compactions)
            await store.enqueue_meta("a", {}).wait()  # barrier: everything before is durable
            stats = store.stats()
            nursery.cancel_scope.cancel()
    assert len(compactions) >= 2400 // compact_count - 2
    assert committed_during_load[0]  # the first writer to finish saw compactions committed
    assert stats["log_rows"] < 2 * compact_count  # the log did not grow unbounded
    loaded = reopen_load(data_dir)
    for env in "ab":
        assert decode_state(loaded[env].updates) == state[env]


async def test_seq_continues_after_reopen_with_empty_log(data_dir: Path) -> None:
    """After compacting everything, the log is empty; a reopened store must not hand out seqs
    the snapshot already covers (load would then drop the new rows)."""
    with Store.open(data_dir) as store:
        for _ in range(5):
            store.enqueue_append("a", os.urandom(20))
        store.enqueue_compact("a", b"SNAP")
    x = os.urandom(20)
    with Store.open(data_dir) as store:
        assert store.stats()["log_rows"] == 0
        store.enqueue_append("a", x)
    assert reopen_load(data_dir)["a"].updates == [b"SNAP", x]


# ---------------------------------------------------------------------------- delete, meta, settings


async def test_delete(data_dir: Path) -> None:
    with Store.open(data_dir, compact_count=3) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for _ in range(3):
                store.enqueue_append("a", os.urandom(30))
            store.enqueue_compact("a", b"SNAP")
            store.enqueue_append("a", os.urandom(30))
            store.enqueue_meta("a", {"x": 1})
            keep = os.urandom(30)
            store.enqueue_append("b", keep)
            await store.enqueue_meta("b", {"y": 2}).wait()
            assert store.env_stats("a")["snapshot_upto"] is not None

            for _ in range(3):
                store.enqueue_append("a", os.urandom(30))
            assert store.needs_compaction("a")
            deleted = store.enqueue_delete("a")
            assert not store.needs_compaction("a")
            await deleted.wait()
            assert store.env_stats("a") == {
                "log_rows": 0,
                "log_bytes": 0,
                "snapshot_bytes": 0,
                "snapshot_upto": None,
                "has_meta": False,
                "rows_since_snapshot": 0,
                "bytes_since_snapshot": 0,
            }
            assert set(store.load()) == {"b"}
            # re-creating after delete, delete + append in one batch
            store.enqueue_append("c", os.urandom(5))
            store.enqueue_delete("c")
            reborn = os.urandom(5)
            await store.enqueue_append("c", reborn).wait()
            nursery.cancel_scope.cancel()
    loaded = reopen_load(data_dir)
    assert set(loaded) == {"b", "c"}
    assert loaded["b"] == LoadedEnv(updates=[keep], meta={"y": 2})
    assert loaded["c"] == LoadedEnv(updates=[reborn], meta={})


async def test_updates_of_lists_what_is_committed_and_what_is_queued(data_dir: Path) -> None:
    """What a rollback rebuilds a document from: committed rows first, then the queue."""
    with Store.open(data_dir, compact_count=100) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.enqueue_append("a", b"a1").wait()
            await store.enqueue_compact("a", b"snap").wait()
            await store.enqueue_append("a", b"a2").wait()
            await store.enqueue_append("b", b"b1").wait()
            nursery.cancel_scope.cancel()
        assert store.updates_of("a") == [b"snap", b"a2"]
        # the writer is stopped: what follows stays queued
        store.enqueue_append("a", b"a3")
        store.enqueue_compact("a", b"snap2")
        store.enqueue_append("b", b"b2")
        assert store.updates_of("a") == [b"snap", b"a2", b"a3", b"snap2"]
        assert store.updates_of("b") == [b"b1", b"b2"]
        store.enqueue_delete("b")  # a queued delete hides the rows it will remove
        store.enqueue_append("b", b"b-again")
        assert store.updates_of("b") == [b"b-again"]
        assert store.updates_of("nothing") == []
    assert reopen_load(data_dir)["b"].updates == [b"b-again"]


async def test_meta_replaces_and_settings(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            store.enqueue_meta("a", {"name": "one", "tags": ["x"]})
            store.enqueue_meta("a", {"name": "two"})
            store.enqueue_meta("meta-only", {"k": b"\x00\x01"})
            t = store.put_setting("identity", {"peer_id": "abc", "key": b"\x01" * 32})
            assert store.get_setting("identity") == {"peer_id": "abc", "key": b"\x01" * 32}
            assert store.get_setting("missing") is None
            assert store.get_setting("missing", 7) == 7
            store.put_setting("n", 1)
            await store.put_setting("n", 2).wait()
            await t.wait()
            with pytest.raises(StoreError):
                store.put_setting("bad", object())
            with pytest.raises(StoreError):
                store.enqueue_meta("a", {"bad": object()})
            with pytest.raises(StoreError):
                store.enqueue_meta("a", ["not", "a", "dict"])  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    with Store.open(data_dir) as store:
        loaded = store.load()
        assert loaded["a"].meta == {"name": "two"}
        assert loaded["a"].updates == []
        assert loaded["meta-only"].meta == {"k": b"\x00\x01"}
        assert store.get_setting("identity") == {"peer_id": "abc", "key": b"\x01" * 32}
        assert store.get_setting("n") == 2
        assert store.get_setting("bad") is None
        assert store.stats()["environments"] == 2


async def test_load_100_environments_one_query_per_table(data_dir: Path) -> None:
    rng = random.Random(6)
    expected: dict[str, LoadedEnv] = {}
    with Store.open(data_dir) as store:
        for i in range(100):
            env = f"env-{i:03d}"
            snap = b"S" + rand_update(rng, 100, 2000)
            rows = [rand_update(rng, 1, 300) for _ in range(i % 7)]
            store.enqueue_append(env, os.urandom(10))
            store.enqueue_compact(env, snap)
            for u in rows:
                store.enqueue_append(env, u)
            store.enqueue_meta(env, {"i": i})
            expected[env] = LoadedEnv(updates=[snap, *rows], meta={"i": i})
    with Store.open(data_dir) as store:
        statements: list[str] = []
        store._reader.set_trace_callback(statements.append)
        loaded = store.load()
        store._reader.set_trace_callback(None)
    assert loaded == expected
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3, statements


# ---------------------------------------------------------------------------- failures


def add_trigger(data_dir: Path, sql: str) -> None:
    conn = sqlite3.connect(data_dir / DB_NAME, timeout=10)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


async def test_failing_write_fails_only_its_ticket(data_dir: Path) -> None:
    with Store.open(data_dir, compact_count=3) as store:
        add_trigger(
            data_dir,
            "CREATE TRIGGER poison BEFORE INSERT ON log WHEN NEW.blob = X'DEAD'"
            " BEGIN SELECT RAISE(ABORT, 'poisoned update'); END",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            good1 = os.urandom(8)
            good2 = os.urandom(8)
            t1 = store.enqueue_append("a", good1)
            bad = store.enqueue_append("a", b"\xde\xad")
            t2 = store.enqueue_append("a", good2)
            assert store.needs_compaction("a")  # 3 rows enqueued
            await t1.wait()
            await t2.wait()
            with pytest.raises(StoreError, match="poisoned update"):
                await bad.wait()
            assert bad.failed
            assert not store.needs_compaction("a")  # recounted: only 2 rows exist
            st = store.stats()
            assert st["failed_writes"] == 1 and st["batched_writes"] == 2
            # the writer is still alive
            await store.enqueue_append("a", b"after").wait()
            nursery.cancel_scope.cancel()
    assert reopen_load(data_dir)["a"].updates == [good1, good2, b"after"]


async def test_failed_transaction_fails_whole_batch_and_writer_survives(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(data_dir) as store:
        add_trigger(
            data_dir,
            "CREATE TRIGGER boom BEFORE INSERT ON log WHEN NEW.blob = X'B0B0'"
            " BEGIN SELECT RAISE(ROLLBACK, 'transaction aborted'); END",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            batch = [
                store.enqueue_append("a", b"one"),
                store.enqueue_meta("a", {"v": 1}),
                store.enqueue_append("a", b"\xb0\xb0"),
                store.enqueue_append("a", b"two"),
            ]
            for t in batch:
                with pytest.raises(StoreError, match="transaction aborted"):
                    await t.wait()
            assert store.stats()["failed_writes"] == 4
            assert store.load() == {}
            assert store.env_stats("a")["rows_since_snapshot"] == 0
            await store.enqueue_append("a", b"three").wait()
            nursery.cancel_scope.cancel()
    assert "commit of 4 writes failed" in caplog.text
    assert reopen_load(data_dir)["a"].updates == [b"three"]


async def durable(ticket: Ticket) -> int:
    """Wait for a write through its retries; how many attempts failed."""
    failures = 0
    while True:
        try:
            await ticket.wait()
            return failures
        except StoreError:
            assert ticket.retry is not None, "a failure that may pass is tried again"
            ticket, failures = ticket.retry, failures + 1


async def test_a_full_disk_keeps_the_writes_and_stores_them_in_order_later(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's own "database or disk is full" (max_page_count): the failed writes fail their
    tickets but are kept and retried ahead of later ones, so no later write is durable on top
    of a hole; once there is room again, all of them are stored, in enqueue order."""
    big = os.urandom(300_000)
    with Store.open(data_dir) as store:

        def limit_pages(n: int) -> None:
            with store._db_lock:
                store._db.execute(f"PRAGMA max_page_count = {n}")

        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.enqueue_append("a", b"first").wait()
            with store._db_lock:
                used = store._db.execute("PRAGMA page_count").fetchone()[0]
            limit_pages(used + 2)  # the disk is full
            failed = store.enqueue_append("a", big)
            with pytest.raises(StoreError, match="kept in memory"):
                await failed.wait()
            assert "full" in store.stats()["error"]
            later = store.enqueue_append("a", b"later")
            other = store.enqueue_append("b", b"other")
            # while the disk is full, the writes behind the hole are tried, and fail, again and
            # again (waited for on their tickets, not for a fixed time)
            with trio.fail_after(TIMEOUT):
                with pytest.raises(StoreError, match="kept in memory"):
                    await later.wait()
                assert later.retry is not None
                with pytest.raises(StoreError, match="kept in memory"):
                    await later.retry.wait()
            assert store.load()["a"].updates == [b"first"]  # nothing committed past the hole
            limit_pages(1 << 30)  # room again
            assert await durable(failed) >= 1
            await durable(later)
            await durable(other)
            assert store.stats()["error"] is None
            nursery.cancel_scope.cancel()
    assert caplog.text.count("kept in memory, trying again") == 1  # once per outage
    assert "writes succeed again" in caplog.text
    loaded = reopen_load(data_dir)
    assert loaded["a"].updates == [b"first", big, b"later"]
    assert loaded["b"].updates == [b"other"]


@ROOT_FOR_MOUNTS
def test_a_full_disk_at_open_is_a_clear_error(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "256k") as disk:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill it up
            with pytest.raises(OSError):
                for _ in range(1024):
                    f.write(b"\0" * 4096)
        with pytest.raises(StoreError, match=r"cannot write .*peerdaemon.lock: No space left"):
            Store.open(disk / "a")
        os.truncate(filler, filler.stat().st_size - (12 << 10))  # room for the lock, not the db
        with pytest.raises(StoreError, match=r"cannot open database in .*(full|I/O)"):
            Store.open(disk / "b")


async def test_newer_schema_is_refused_and_lock_released(data_dir: Path) -> None:
    Store.open(data_dir).close()
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(data_dir)
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.close()
    Store.open(data_dir).close()  # the failed open did not keep the lock


# ---------------------------------------------------------------------------- shutdown


async def test_cancelled_writer_flushes_queue(data_dir: Path) -> None:
    """The supervisor cancels run(): everything enqueued before must be committed by run()
    itself (shielded final flush), with tickets completed, before close()."""
    rng = random.Random(7)
    expected = [rand_update(rng, 1, 5000) for _ in range(6000)]
    store = Store.open(data_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.enqueue_append("a", expected[0]).wait()
        tickets = [store.enqueue_append("a", u) for u in expected[1:]]
        nursery.cancel_scope.cancel()
    assert all(t.done and not t.failed for t in tickets)
    assert store.stats()["queued"] == 0
    assert store.stats()["log_rows"] == 6000
    store.close()
    assert reopen_load(data_dir)["a"].updates == expected


async def test_close_without_writer_flushes(data_dir: Path) -> None:
    store = Store.open(data_dir)
    u = os.urandom(100)
    t = store.enqueue_append("a", u)
    s = store.put_setting("k", "v")
    store.close()
    store.close()  # twice is fine
    assert t.done and not t.failed and s.done
    await t.wait()
    with pytest.raises(StoreError, match="closed"):
        store.enqueue_append("a", b"x")
    assert reopen_load(data_dir)["a"].updates == [u]


async def test_close_while_writer_running(data_dir: Path) -> None:
    """close() with run() active and a batch in the middle of its COMMIT: every write is
    committed once, in order, every ticket done when close() returns, and run() returns on its
    own."""
    expected = [os.urandom(50) for _ in range(3000)]
    store = Store.open(data_dir)
    held = _HeldCommit(store._db)
    store._db = held  # type: ignore[assignment]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            tickets = [store.enqueue_append("a", u) for u in expected[:2500]]
            committing = await trio.to_thread.run_sync(held.committing.wait, TIMEOUT)
            assert committing, "the writer never reached COMMIT"
            tickets += [store.enqueue_append("a", u) for u in expected[2500:]]
            assert store._inflight is not None  # the path this test is about
            threading.Timer(0.05, held.release.set).start()  # while close() waits for it
            store.close()
            assert all(t.done for t in tickets)
    finally:
        held.release.set()
        store._db = held._db
        store.close()
    await wait_all(tickets)
    assert reopen_load(data_dir)["a"].updates == expected


# ---------------------------------------------------------------------------- lock


async def test_second_open_in_same_process_is_locked(data_dir: Path) -> None:
    store = Store.open(data_dir)
    with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}\)"):
        Store.open(data_dir)
    store.close()
    Store.open(data_dir).close()


HOLD_LOCK = """
import sys
from pathlib import Path
from peerdaemon.store import Store
store = Store.open(Path(sys.argv[1]))
print("LOCKED", flush=True)
sys.stdin.read()
"""


def test_lock_refuses_second_process_and_dies_with_holder(data_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = holder.stdout.readline()
        assert line == b"LOCKED\n", holder.stderr.read()
        with pytest.raises(StoreLockedError) as info:
            Store.open(data_dir)
        message = str(info.value)
        assert message == (
            f"data directory {data_dir} is in use by another peerdaemon (pid {holder.pid})"
        )
        # kill -9: the kernel drops the flock, no stale-lock cleanup needed
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=TIMEOUT)
        Store.open(data_dir).close()
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=TIMEOUT)
        holder.stdin.close()
        holder.stdout.close()
        holder.stderr.close()


def test_lock_holder_in_this_process_refuses_child(data_dir: Path) -> None:
    with Store.open(data_dir):
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\nfrom pathlib import Path\nfrom peerdaemon.store import Store\n"
                "Store.open(Path(sys.argv[1]))",
                str(data_dir),
            ],
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert child.returncode == 1
    assert b"StoreLockedError" in child.stderr
    assert f"(pid {os.getpid()})".encode() in child.stderr


# ---------------------------------------------------------------------------- crash (kill -9)


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


@pytest.mark.parametrize("mode", ["plain", "compact"])
@pytest.mark.parametrize("kill_after", [150, 700])
def test_kill9_loses_no_acknowledged_update(tmp_path: Path, mode: str, kill_after: int) -> None:
    """A child appends from many tasks and prints each update once its ticket completed; we
    SIGKILL it mid-stream and every printed update must be in the reopened store, at the
    position it was enqueued at."""
    data_dir = tmp_path / "data"
    stderr_path = tmp_path / "child.stderr"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(CRASH_CHILD), str(data_dir), mode],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    lines: queue.Queue = queue.Queue()
    pump = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
    pump.start()
    raw: list[bytes] = []
    try:
        first = lines.get(timeout=TIMEOUT)
        assert first == b"READY\n", stderr_path.read_text()
        while len(raw) < kill_after:
            line = lines.get(timeout=TIMEOUT)
            assert line is not None, stderr_path.read_text()
            raw.append(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=TIMEOUT)
    pump.join(timeout=TIMEOUT)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL  # it was killed mid-stream, did not exit
    while (line := lines.get_nowait()) is not None:
        raw.append(line)  # acknowledged between our last read and the kill

    acked = []
    for line in raw:
        if not line.endswith(b"\n"):
            continue  # cut off by the kill
        env, index, digest = line.decode().split()
        acked.append((env, int(index), digest))
    assert len(acked) >= kill_after

    with Store.open(data_dir) as store:  # the dead child's lock is gone
        loaded = store.load()
    rebuilt: dict[str, list[str]] = {}
    snapshots = 0
    for env, le in loaded.items():
        digests: list[str] = []
        for i, u in enumerate(le.updates):
            if u[:1] == b"S":
                assert i == 0
                digests = cbor2.loads(u[1:])
                snapshots += 1
            else:
                assert u[:1] == b"U"
                digests.append(hashlib.sha256(u).hexdigest())
        rebuilt[env] = digests
    for env, index, digest in acked:
        assert index < len(rebuilt.get(env, [])), f"acknowledged update {env}#{index} lost"
        assert rebuilt[env][index] == digest, f"{env}#{index} differs or out of order"
    if mode == "compact":
        assert snapshots > 0


# ---------------------------------------------------------------------------- ack after commit


class _HeldCommit:
    """The writer's connection, except that COMMIT waits until the test releases it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.committing = threading.Event()
        self.release = threading.Event()

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql.strip().upper() == "COMMIT":
            self.committing.set()
            if not self.release.wait(TIMEOUT):
                raise AssertionError("the test never released the commit")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


async def test_no_ticket_is_done_before_its_commit_returns(data_dir: Path) -> None:
    """Deterministic form of the kill -9 tests: while the batch's COMMIT is held open, none of
    its tickets may be done (an acknowledged write must survive a crash at that moment); they
    are all done once it returns, and then the writes are in the file."""
    store = Store.open(data_dir)
    held = _HeldCommit(store._db)
    store._db = held  # type: ignore[assignment]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            tickets = [
                store.enqueue_append("a", b"U1"),
                store.enqueue_meta("a", {"name": "A"}),
                store.put_setting("k", 1),
                store.enqueue_append("a", b"U2"),
            ]
            called: list[Ticket] = []
            for t in tickets:
                t.add_done_callback(called.append)
            try:
                committing = await trio.to_thread.run_sync(held.committing.wait, TIMEOUT)
                assert committing, "the writer never reached COMMIT"
                await wait_all_tasks_blocked()  # every chance to complete them early
                assert [t.done for t in tickets] == [False] * 4
                assert called == []
                with store._read() as r:  # a reader sees nothing of the batch yet
                    assert r.execute("SELECT count(*) FROM log").fetchone()[0] == 0
            finally:
                held.release.set()  # (the writer's flush is shielded: never leave it held)
            with trio.fail_after(TIMEOUT):
                await wait_all(tickets)
            assert called == tickets  # in order
            nursery.cancel_scope.cancel()
    finally:
        held.release.set()
        store._db = held._db
        store.close()
    assert reopen_load(data_dir)["a"].updates == [b"U1", b"U2"]


async def test_the_writer_thread_commits_while_the_trio_thread_is_busy(data_dir: Path) -> None:
    """The writer takes a write the moment it is queued, in a thread of its own: it reaches
    COMMIT while the trio thread is still busy (here: blocked, never yielding) with the request
    that queued it, instead of waiting for a trio task to hand it the batch."""
    store = Store.open(data_dir)
    held = _HeldCommit(store._db)
    store._db = held  # type: ignore[assignment]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await wait_all_tasks_blocked()  # run() waits on its thread
            ticket = store.enqueue_append("a", b"U1")
            try:
                # no checkpoint from here on: the trio thread does not run any task
                assert held.committing.wait(TIMEOUT), "the commit waited for the trio thread"
                assert not ticket.done
            finally:
                held.release.set()
            with trio.fail_after(TIMEOUT):
                await ticket.wait()
            nursery.cancel_scope.cancel()
    finally:
        held.release.set()
        store._db = held._db
        store.close()
    assert reopen_load(data_dir)["a"].updates == [b"U1"]


async def test_a_late_waking_writer_starts_when_the_task_yields(data_dir: Path) -> None:
    """`wake_late` (the hub's store): what one task step queues is committed once that task
    yields, in one batch, not while the step still runs (relaying to every client)."""
    store = Store.open(data_dir, wake_late=True)
    held = _HeldCommit(store._db)
    store._db = held  # type: ignore[assignment]
    held.release.set()  # commits go through; `committing` says one began
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.settled()  # the writer thread waits for work (not still starting)
            tickets = [store.enqueue_append("a", f"U{i}".encode()) for i in range(3)]
            # no checkpoint: the writer was not woken
            assert not held.committing.wait(0.2), "the writer started inside the task's step"
            with trio.fail_after(TIMEOUT):
                for ticket in tickets:
                    await ticket.wait()  # (the first checkpoint wakes it)
            assert store.stats()["commits"] == 1
            nursery.cancel_scope.cancel()
    finally:
        store._db = held._db
        store.close()
    assert reopen_load(data_dir)["a"].updates == [b"U0", b"U1", b"U2"]


async def test_ticket_callbacks_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Callbacks run once done, in the order added (at once when added after); one that raises
    is logged and the others still run. `error()` is what `wait()` raises."""
    calls: list[str] = []

    def boom(t: Ticket) -> None:
        raise RuntimeError("boom")

    ticket = Ticket(7)
    ticket.add_done_callback(lambda t: calls.append("first"))
    ticket.add_done_callback(boom)
    ticket.add_done_callback(lambda t: calls.append("second"))
    assert calls == [] and ticket.error() is None and not ticket.done
    ticket._complete()
    assert calls == ["first", "second"] and "boom" in caplog.text
    ticket.add_done_callback(lambda t: calls.append("late"))
    assert calls[-1] == "late"
    await ticket.wait()
    ticket._complete(RuntimeError("ignored: completed once"))
    assert ticket.error() is None

    failed, again = Ticket(), Ticket()
    failed.retry = again
    failed._complete(sqlite3.OperationalError("database or disk is full"))
    error = failed.error()
    assert isinstance(error, StoreError) and "kept in memory" in str(error)
    assert isinstance(error.__cause__, sqlite3.OperationalError)
    with pytest.raises(StoreError, match="kept in memory"):
        await failed.wait()
    lost = Ticket()
    lost._complete(sqlite3.IntegrityError("constraint"))
    with pytest.raises(StoreError, match="write failed: constraint"):
        await lost.wait()


# ------------------------------------------------------------------ when the writer wakes
def count_wakes(store: Store) -> list[int]:
    """Every wake-up of the writer (`_cond.notify`), counted."""
    wakes: list[int] = []
    notify = store._cond.notify

    def counted(n: int = 1) -> None:
        wakes.append(n)
        notify(n)

    store._cond.notify = counted  # type: ignore[method-assign]
    return wakes


async def test_wake_after_wakes_the_writer_once_at_its_end(data_dir: Path) -> None:
    """A peer's update: the change event and relays go out before the writer contends for the
    GIL; what was queued inside is committed all the same."""
    with Store.open(data_dir) as store:
        wakes = count_wakes(store)
        tickets = [store.enqueue_append("a", b"1")]
        assert len(wakes) == 1  # at the enqueue, as ever
        with store.wake_after():
            tickets.append(store.enqueue_append("a", b"2"))
            with store.wake_after():  # nested: the outer one wakes it
                tickets.append(store.enqueue_append("b", b"3"))
            assert len(wakes) == 1
        assert len(wakes) == 2
        with store.wake_after():
            pass
        assert len(wakes) == 2  # nothing queued: no wake-up
        with pytest.raises(RuntimeError), store.wake_after():
            tickets.append(store.enqueue_append("a", b"4"))
            raise RuntimeError("the caller failed after the enqueue")
        assert len(wakes) == 3  # still woken: what is queued is written
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await wait_all(tickets)
            nursery.cancel_scope.cancel()
    assert reopen_load(data_dir)["a"].updates == [b"1", b"2", b"4"]
