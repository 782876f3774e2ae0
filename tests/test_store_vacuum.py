"""The store gives space back (docs/store.md, "Giving space back"): incremental vacuum after
compactions and deletes, the one-time conversion of an older database, and kill -9 during both.
File sizes are the real ones on disk."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cbor2
import pytest
import trio
from daemonproc import ROOT_FOR_MOUNTS, small_disk

from peerdaemon.store import DB_NAME, Store
from peerdaemon.store import sqlite as store_sqlite

HERE = Path(__file__).resolve().parent
CHILD = HERE / "store_vacuum_child.py"
TIMEOUT = 60.0
MB = 1 << 20


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def file_bytes(data_dir: Path) -> int:
    """The database and its WAL on disk."""
    return sum(p.stat().st_size for p in data_dir.glob(DB_NAME + "*") if not p.name.endswith("shm"))


def auto_vacuum(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        return conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    finally:
        conn.close()


def make_old_format(data_dir: Path) -> None:
    """Turn the (closed) store into what peerdaemon wrote before incremental vacuum."""
    conn = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    assert auto_vacuum(data_dir) == 0


def contents(data_dir: Path) -> dict[str, list[bytes]]:
    with Store.open(data_dir) as store:
        return {env: loaded.updates for env, loaded in store.load().items()}


async def fill(store: Store, env: str, n: int, size: int = 4096) -> list[bytes]:
    updates = [os.urandom(size) for _ in range(n)]
    tickets = [store.enqueue_append(env, u) for u in updates]
    await tickets[-1].wait()
    return updates


async def test_the_file_shrinks_after_compaction_and_delete(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        assert store.incremental_vacuum  # a new database has it from the start
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await fill(store, "a", 3000)
            kept = await fill(store, "b", 200)
            await store.settled()
            peak = file_bytes(data_dir)
            assert peak > 12 * MB
            await store.enqueue_compact("a", b"snapshot").wait()
            await store.enqueue_delete("c").wait()
            await store.settled()
            after = file_bytes(data_dir)
            assert store.stats()["vacuumed_pages"] > 2000
            # what is left: b's 800 kB, and a page or so per table and index
            assert after < 1.2 * MB, (peak, after)
            nursery.cancel_scope.cancel()
    assert contents(data_dir) == {"a": [b"snapshot"], "b": kept}


async def test_steps_are_bounded_and_writes_go_between_them(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write enqueued while space is being given back is committed before the vacuum is
    over: the vacuum goes in steps of `VACUUM_STEP_PAGES`, each its own transaction."""
    monkeypatch.setattr(store_sqlite, "VACUUM_STEP_PAGES", 64)
    steps: list[int] = []
    first_step = trio.Event()
    with Store.open(data_dir) as store:
        vacuum_some = store._vacuum_some

        def step() -> bool:
            more = vacuum_some()
            steps.append(store._vacuumed_pages)
            trio.from_thread.run_sync(first_step.set)
            return more

        monkeypatch.setattr(store, "_vacuum_some", step)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await fill(store, "a", 1000)
            store.enqueue_delete("a")
            await first_step.wait()
            await store.enqueue_append("b", b"between").wait()
            during = len(steps)
            await store.settled()
            assert steps[0] <= 64
            assert len(steps) > during + 3  # the write did not wait for the whole vacuum
            assert store.stats()["vacuumed_pages"] >= 1000
            nursery.cancel_scope.cancel()
    assert contents(data_dir) == {"b": [b"between"]}


async def test_an_older_database_is_converted_once_keeping_everything(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "peerdaemon.store")
    with Store.open(data_dir) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await fill(store, "a", 2000)
            await fill(store, "b", 100)
            store.put_setting("identity", {"name": "x"})
            nursery.cancel_scope.cancel()
    make_old_format(data_dir)
    before = contents(data_dir)

    with Store.open(data_dir) as store:
        assert not store.incremental_vacuum
        async with trio.open_nursery() as nursery:
            queued = store.enqueue_append("b", b"queued while converting")
            await nursery.start(store.run)
            await queued.wait()
            await store.settled()
            assert store.incremental_vacuum
            assert store.stats()["incremental_vacuum"]
            await store.enqueue_delete("a").wait()
            await store.settled()
            assert file_bytes(data_dir) < 1 * MB  # and it gives space back from now on
            nursery.cancel_scope.cancel()
    assert caplog.text.count("converting") == 1
    assert auto_vacuum(data_dir) == 2
    assert contents(data_dir) == {"b": [*before["b"], b"queued while converting"]}
    with Store.open(data_dir) as store:
        assert store.incremental_vacuum
        assert store.get_setting("identity") == {"name": "x"}


@ROOT_FOR_MOUNTS
async def test_a_conversion_that_does_not_fit_leaves_a_working_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No room for the rebuilt copy: the old file stays as it is, writes go on, and the next
    start tries again."""
    made = tmp_path / "made"
    with Store.open(made) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await fill(store, "a", 900)  # ~3.7 MB: the copy needs as much again
            nursery.cancel_scope.cancel()
    make_old_format(made)
    with small_disk(tmp_path / "disk", "6m") as disk:
        data_dir = disk / "data"
        data_dir.mkdir(mode=0o700)
        shutil.copyfile(made / DB_NAME, data_dir / DB_NAME)
        with Store.open(data_dir) as store:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await store.settled()
                assert not store.incremental_vacuum
                await store.enqueue_append("b", b"still written").wait()
                nursery.cancel_scope.cancel()
        assert "not converted" in caplog.text
        assert auto_vacuum(data_dir) == 0
        assert contents(data_dir)["b"] == [b"still written"]


# ---------------------------------------------------------------------------- kill -9


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


class Child:
    def __init__(self, tmp_path: Path, data_dir: Path, mode: str) -> None:
        self.stderr_path = tmp_path / "child.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(data_dir), mode],
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self.lines: queue.Queue = queue.Queue()
        self.pump = threading.Thread(target=_pump, args=(self.proc.stdout, self.lines))
        self.pump.start()

    def line(self) -> bytes:
        line = self.lines.get(timeout=TIMEOUT)
        assert line is not None, self.stderr_path.read_text()
        return line

    def kill(self) -> list[bytes]:
        """SIGKILL; -> the lines printed after the last one read."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        finally:
            self.proc.wait(timeout=TIMEOUT)
            self.pump.join(timeout=TIMEOUT)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        assert self.proc.returncode == -signal.SIGKILL  # killed, did not exit
        rest = []
        while (line := self.lines.get_nowait()) is not None:
            rest.append(line)
        return rest


def test_kill9_while_giving_space_back_loses_no_acknowledged_update(tmp_path: Path) -> None:
    """A child writes, compacts and deletes so that the writer gives pages back in many small
    steps, with writes between them; SIGKILLed just after a step, every update it acknowledged
    is in the reopened store, in order."""
    data_dir = tmp_path / "data"
    child = Child(tmp_path, data_dir, "vacuum")
    raw: list[bytes] = []
    vacuumed = 0
    try:
        assert child.line() == b"READY\n"
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert time.monotonic() < deadline, f"{vacuumed} vacuum steps seen"
            line = child.line()
            if not line.startswith(b"VACUUMED"):
                raw.append(line)
                continue
            vacuumed += 1
            if len(raw) >= 400 and vacuumed >= 3:
                break  # killed right after a step: most likely in the middle of a run
    finally:
        raw += child.kill()
    acked = []
    for line in raw:
        if line.endswith(b"\n") and not line.startswith(b"VACUUMED"):
            env, index, digest = line.decode().split()
            acked.append((env, int(index), digest))
    assert len(acked) >= 400

    with Store.open(data_dir) as store:
        loaded = store.load()
        assert store.incremental_vacuum
    rebuilt: dict[str, list[str]] = {}
    for env, le in loaded.items():
        if env == "scratch":
            continue
        digests: list[str] = []
        for i, u in enumerate(le.updates):
            if u[:1] == b"S":
                assert i == 0
                digests = cbor2.loads(u[1:])
            else:
                digests.append(hashlib.sha256(u).hexdigest())
        rebuilt[env] = digests
    for env, index, digest in acked:
        assert index < len(rebuilt.get(env, [])), f"acknowledged update {env}#{index} lost"
        assert rebuilt[env][index] == digest, f"{env}#{index} differs or out of order"


def test_kill9_during_the_conversion_keeps_the_old_file(tmp_path: Path) -> None:
    """The conversion is one transaction: killed in the middle, the store reopens with all it
    held (still to convert); the next writer converts it."""
    data_dir = tmp_path / "data"

    async def make() -> None:
        with Store.open(data_dir) as store:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                for i in range(20):  # ~80 MB: the conversion takes a while
                    await fill(store, f"env-{i}", 1000)
                nursery.cancel_scope.cancel()

    trio.run(make)
    make_old_format(data_dir)
    before = contents(data_dir)

    child = Child(tmp_path, data_dir, "migrate")
    try:
        assert child.line() == b"MIGRATING\n"
        time.sleep(0.1)  # into the VACUUM (it takes about a second here)
    finally:
        rest = child.kill()
    assert b"DONE\n" not in rest, "killed too late to test anything"
    assert auto_vacuum(data_dir) == 0
    assert contents(data_dir) == before

    async def convert() -> None:
        with Store.open(data_dir) as store:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await store.settled()
                assert store.incremental_vacuum
                nursery.cancel_scope.cancel()

    trio.run(convert)
    assert auto_vacuum(data_dir) == 2
    assert contents(data_dir) == before
