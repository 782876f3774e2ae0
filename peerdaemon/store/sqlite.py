"""Crash-safe SQLite store: per-environment update log + snapshots, written by group commit.

Why this shape (details in docs/store.md):
- Callers on the trio thread enqueue synchronously (no await, so the order of enqueues is the
  order of the log) and get a Ticket. One writer thread (started by `run()`, for its lifetime)
  takes everything queued as soon as the enqueuing task yields, commits it in ONE transaction,
  and hands the batch back to the trio thread with one `run_sync_soon`, which completes the
  tickets only after COMMIT returned. With WAL + synchronous=FULL, a completed ticket survives a
  process crash or power loss. No trio task or `to_thread` round per batch, and one wake-up of
  the loop. When the writer wakes is the opener's choice (`wake_late`): at the enqueue (the
  daemon: a sequential writer's commit starts while the trio thread still answers the request),
  or by a trio task of its own `LATE_GATHER` (2 ms) after the first write queued (the hub: one
  wake-up and one commit for a burst of clients' writes, and the commit's work kept out of the
  relay that follows each write: measured, the hub's edit latency p50/p99 went from 0.97/2.60
  to 0.71/1.81 ms, as with the old writer task; a thread woken at once contends for the GIL with the rest of that step, the relay to
  every client of the room, which releases the GIL at every `write`, and measurably delays it;
  nobody waits for the hub's commit before the relay, docs/hub.md "Durability"). A caller may
  also hold the wake-up to the end of a step (`wake_after`: the daemon's merge of a peer's
  update, whose change event and relays come first; its ticket, the peer's ack, still waits
  for COMMIT).
- While a batch commits, new work piles up for the next one, so fsync latency bounds the commit
  rate, not the write rate.
- pycrdt objects never reach the writer thread: ops carry bytes only, tickets stay on the trio
  thread (the writer never touches them).
- Every append gets a global `seq` at enqueue time; a compaction records the last seq enqueued
  before it and deletes only rows up to it, atomically with writing the snapshot.
- A batch that fails for a reason that may pass (disk full, I/O error) fails its tickets but
  goes back to the head of the queue and is retried with backoff: the callers' documents already
  hold those changes, and a later write of the same document must not become durable on top of
  a hole (it would be acknowledged, and lost at the next start).
- The file gives back what compactions and deletes free (`auto_vacuum=INCREMENTAL`): the writer
  moves free pages out in bounded steps of their own when it has nothing else to write, so a
  step never holds a write back for long. A database made before that is rebuilt once by a
  `VACUUM` at the writer's start (the only way to turn it on; atomic, so a crash keeps the old
  file), while the daemon already serves from memory and its writes queue.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import trio

from .errors import StoreError, StoreLockedError
from .lock import DataDirLock

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "LoadedEnv",
    "HistoryRow",
    "TrashRow",
    "Store",
    "StoreError",
    "StoreLockedError",
    "Ticket",
]

log = logging.getLogger(__name__)

DB_NAME = "peerdaemon.sqlite3"
SCHEMA_VERSION = 2

# Bounds of one group commit: large enough to amortise the fsync, small enough that one
# transaction does not hold tens of MB in the WAL or keep early tickets waiting long.
MAX_BATCH_OPS = 2048
MAX_BATCH_BYTES = 32 << 20

# Retrying a batch that failed for a reason that may pass: first delay, then doubling to the max.
RETRY_INITIAL = 0.25
RETRY_MAX = 5.0

# SQLite primary result codes of failures that may pass: BUSY, LOCKED, NOMEM, IOERR, FULL,
# CANTOPEN, PROTOCOL (extended codes carry the primary code in their low byte).
_TRANSIENT_CODES = frozenset({5, 6, 7, 10, 13, 14, 15})

# Incremental vacuum (docs/store.md, "Giving space back"): worth a run from this many free
# pages, and from this fraction of the file (below, appends soon reuse them); at most this many
# pages per step (4 MiB of 4 KiB pages: a few ms of writing, and what a write may wait for); a
# run starts once the writer had nothing to write for VACUUM_IDLE seconds, or after this many
# batches if it never has.
VACUUM_MIN_FREE_PAGES = 64
VACUUM_FREE_FRACTION = 8
VACUUM_STEP_PAGES = 1024
VACUUM_IDLE = 0.5
VACUUM_EVERY_BATCHES = 64
_FREEING = frozenset({"delete", "compact", "prune", "trash", "untrash"})


# Upper bounds (seconds) of the commit-latency histogram (`Store.commit_times`).
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


LATE_GATHER = 0.002
"""A late-waking writer (`wake_late`) starts this long after the first write queued."""


class CommitTimes:
    """How long the writer's batches took (seconds, in the writer thread, until COMMIT
    returned), bucketed by `COMMIT_BUCKETS`; the last count is the batches past the largest
    bound. Trio thread only. The hub's `/metrics` reads it."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self) -> None:
        self.bounds = COMMIT_BUCKETS
        self.counts = [0] * (len(COMMIT_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds


def _transient(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error) and isinstance(code, int) and code & 0xFF in _TRANSIENT_CODES
    )


_SCHEMA_V1 = """
CREATE TABLE log (
    seq    INTEGER PRIMARY KEY,      -- global, assigned at enqueue time, increasing
    env_id TEXT    NOT NULL,
    blob   BLOB    NOT NULL          -- one Yjs update, opaque to the store
);
CREATE INDEX log_env_seq ON log (env_id, seq);
CREATE TABLE snapshots (
    env_id TEXT    PRIMARY KEY,
    upto   INTEGER NOT NULL,         -- covers every log row of env_id with seq <= upto
    blob   BLOB    NOT NULL
);
CREATE TABLE env_meta (
    env_id TEXT PRIMARY KEY,
    meta   BLOB NOT NULL             -- CBOR map
);
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL              -- CBOR
);
"""

# Version 2: environments' history and the trash (core/history.py, docs/history.md). Rows are
# written through the same writer as the log, so a version taken before a change is durable
# before (or with) the change, and a trash row with the delete that made it.
_SCHEMA_V2 = """
CREATE TABLE history (
    id      INTEGER PRIMARY KEY,
    env_id  TEXT    NOT NULL,
    version INTEGER NOT NULL,        -- per environment, increasing
    time    REAL    NOT NULL,        -- unix seconds
    reason  TEXT    NOT NULL,
    info    BLOB    NOT NULL,        -- CBOR map: devices, summary...
    digest  BLOB    NOT NULL,        -- sha256 of the JSON: an identical snapshot is skipped
    blob    BLOB    NOT NULL         -- the environment's JSON, zlib-compressed
);
CREATE UNIQUE INDEX history_env_version ON history (env_id, version);
CREATE TABLE trash (
    env_id TEXT PRIMARY KEY,
    time   REAL NOT NULL,
    info   BLOB NOT NULL,            -- CBOR map: name, origin...
    blob   BLOB NOT NULL             -- the environment's last JSON, zlib-compressed
);
"""

# version -> script that upgrades (version - 1) to version. Version 1 is the initial schema.
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}


@dataclass
class LoadedEnv:
    """One environment as read at startup: apply `updates` in order to an empty document."""

    updates: list[bytes] = field(default_factory=list)  # snapshot first (if any), then log rows
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One stored version of an environment, without its content (`history_blob`)."""

    env_id: str
    version: int
    time: float
    reason: str
    info: dict
    digest: bytes
    size: int  # bytes of the compressed JSON


@dataclass(frozen=True, slots=True)
class TrashRow:
    """A deleted environment's last content in the trash, without it (`trash_blob`)."""

    env_id: str
    time: float
    info: dict
    size: int


class Ticket:
    """Completion handle of one enqueued write.

    `await wait()` returns once the write is committed (durable) and raises StoreError if it
    failed. Any number of tasks may wait, before or after completion; `add_done_callback` lets
    a caller (the socket server) answer without a task waiting per write. A write that failed
    for a reason that may pass is tried again: `retry` is then the ticket of that next attempt.
    """

    __slots__ = ("_done", "_event", "_error", "_callbacks", "retry", "seq")

    def __init__(self, seq: int | None = None) -> None:
        self._done = False
        self._event: trio.Event | None = None  # made by the first waiter
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Ticket], None]] | None = None
        self.retry: Ticket | None = None
        self.seq = seq  # the log seq of an append, else None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def latest(self) -> Ticket:
        """The newest attempt of this write (itself unless it failed and is being retried)."""
        ticket = self
        while ticket.retry is not None:
            ticket = ticket.retry
        return ticket

    async def wait(self) -> None:
        """Block until durable; raise StoreError if the write was not committed."""
        if not self._done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        else:
            await trio.lowlevel.checkpoint()
        error = self.error()
        if error is not None:
            raise error

    def error(self) -> StoreError | None:
        """Once done, what `wait()` raises: None if the write is durable."""
        if self._error is None:
            return None
        if self.retry is not None:
            error = StoreError(
                f"not stored: {self._error}. The change is kept in memory and stored as soon"
                " as the disk accepts it (until then, stopping the daemon would lose it)"
            )
        else:
            error = StoreError(f"write failed: {self._error}")
        error.__cause__ = self._error
        return error

    def add_done_callback(self, fn: Callable[[Ticket], None]) -> None:
        """Call `fn(self)` on the trio thread once done (now, if it is): sync, in the order
        added; what it raises is logged and dropped."""
        if self._done:
            _call_back(fn, self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

    def _complete(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            _call_back(fn, self)


def _call_back(fn: Callable[[Ticket], None], ticket: Ticket) -> None:
    try:
        fn(ticket)
    except Exception:
        log.exception("store: callback %r of a ticket failed", fn)


@dataclass(slots=True)
class _Op:
    kind: str  # "append" | "meta" | "delete" | "compact" | "setting" | "version" | "prune"...
    key: str  # env id, or setting key
    blob: bytes | None
    seq: int  # append: its seq; compact: last seq covered
    ticket: Ticket
    row: tuple[Any, ...] = ()  # the other columns of a history or trash row


_Outcome = list[BaseException | None] | BaseException  # per-op errors, or the batch's error


@dataclass(slots=True)
class _Written:
    """A batch the writer thread is done with, for the trio thread to complete its tickets."""

    ops: list[_Op]
    outcome: _Outcome
    requeued: bool  # failed for a reason that may pass and went back to the head of the queue
    seconds: float  # how long the transaction took


class _Counts:
    """Rows/bytes of the log since the env's last snapshot, as enqueued."""

    __slots__ = ("rows", "bytes")

    def __init__(self, rows: int = 0, nbytes: int = 0) -> None:
        self.rows = rows
        self.bytes = nbytes


class Store:
    """The update log + snapshots of every environment in one SQLite file, plus the dir lock.

    Threading: every public method except `run()` is synchronous and must be called from the
    trio thread (or before/after trio runs). The writer connection is only used by the writer
    thread of `run()` (or by `close()` once that thread returned); sync reads (`load`, `stats`,
    `env_stats`) go through a second, query-only connection, which in WAL mode never blocks on
    the writer. `_cond` guards what both threads touch: the queue, `_inflight`, `_written` and
    the writer's flags; tickets, counters and `_counts` belong to the trio thread.
    """

    def __init__(
        self,
        data_dir: Path,
        lock: DataDirLock,
        db: sqlite3.Connection,
        reader: sqlite3.Connection,
        *,
        compact_count: int,
        compact_bytes: int,
    ) -> None:
        self.data_dir = data_dir
        self.db_path = data_dir / DB_NAME
        self.compact_count = compact_count
        self.compact_bytes = compact_bytes
        self._lock = lock
        self._db = db
        self._db_lock = threading.Lock()  # writer connection: writer thread vs close()
        self._reader = reader
        self._reader_lock = threading.Lock()
        self._queue: collections.deque[_Op] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._written: list[_Written | None] = []  # None: the writer went idle (`settled`)
        self._written_posted = False  # a `_take_written` is on its way to the trio thread
        self._token: trio.lowlevel.TrioToken | None = None
        self.wake_late = False
        """Enqueues on the trio thread wake the writer once their task yields (module docstring)."""
        self._trio_thread: int | None = None  # run()'s thread
        self._kick_event = trio.Event()  # set: `_kicker` wakes the writer
        self._no_writer = threading.Event()  # set while no writer thread runs
        self._no_writer.set()
        self._stop = False  # run() is cancelled: write what is queued, one attempt each, return
        self._settle_wanted = False
        self._closed = False
        self._db_closed = False
        self._running = False
        self._holding = False  # inside `wake_after`: enqueues do not wake the writer ...
        self._held = False  # ... and one did
        self._inflight: list[_Op] | None = None  # the batch the writer thread is writing
        self._next_seq = 1
        self._counts: dict[str, _Counts] = {}
        self._settings: dict[str, Any] = {}
        self._commits = 0
        self._batched_writes = 0
        self._failed_writes = 0
        self._retry_delay = 0.0  # writer thread: > 0 while failed batches wait to be tried again
        self._last_error: str | None = None  # writer thread: why they failed
        self._error: str | None = None  # the same, as the trio thread learnt it (`stats()`)
        self.commit_times = CommitTimes()
        self.incremental_vacuum = _auto_vacuum(db) == _INCREMENTAL
        """False for a database made before it existed, until the writer's migration ran."""
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        self._vacuum_due = free >= VACUUM_MIN_FREE_PAGES  # look when the writer is idle
        self._vacuum_running = False  # a run of steps is under way: go down to no free page
        self._vacuum_batches = 0  # batches written since a step became due
        self._vacuumed_pages = 0
        self._migrating = False  # the one-time VACUUM runs in the writer thread
        self._settled: trio.Event | None = None  # `settled()` waits for the writer's idle

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        compact_count: int = 1000,
        compact_bytes: int = 8 << 20,
        wake_late: bool = False,
    ) -> Store:
        """Lock `data_dir` (created 0700 if missing), open/upgrade the database, read counters.

        Raises StoreLockedError if another process holds the directory, StoreError if the
        database cannot be opened or was written by a newer peerdaemon.
        """
        if compact_count < 1 or compact_bytes < 1:
            raise ValueError("compaction thresholds must be positive")
        data_dir = Path(data_dir)
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create data directory {data_dir}: {e}") from e
        lock = DataDirLock(data_dir)
        lock.acquire()
        db = reader = None
        try:
            db_path = data_dir / DB_NAME
            db = _connect(db_path)
            _init_writer(db)
            reader = _connect(db_path)
            reader.execute("PRAGMA query_only = ON")
            store = cls(
                data_dir,
                lock,
                db,
                reader,
                compact_count=compact_count,
                compact_bytes=compact_bytes,
            )
            store.wake_late = wake_late
            store._read_counters()
            return store
        except BaseException as e:
            for conn in (reader, db):
                if conn is not None:
                    conn.close()
            lock.release()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open database in {data_dir}: {e}") from e
            raise

    def close(self) -> None:
        """Flush anything still queued (synchronously), close the database, release the lock.

        Safe to call twice. Normally `run()` has already flushed during shutdown; the flush
        here covers a store that was used without a running writer, or one still running (it
        waits for the writer's current batch, which may block for one commit).
        """
        if self._closed:
            return
        with self._cond:
            self._closed = True  # a running writer finishes its batch or step and returns
            self._cond.notify_all()
            migrating = self._migrating
        if migrating:  # a one-time VACUUM may take long: stop it (it runs again next time)
            self._db.interrupt()
        try:
            self._no_writer.wait()
            self._take_written()  # complete what it wrote, in order, before what follows
            with self._db_lock:
                while self._queue:
                    ops = self._take_batch()
                    self._finish_batch(_Written(ops, self._apply_batch_safe(ops), False, 0.0))
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as e:  # harmless: the WAL is replayed at the next open
                    log.warning("store: WAL checkpoint at close failed: %s", e)
                self._db.close()
                self._db_closed = True
            with self._reader_lock:
                self._reader.close()
        finally:
            self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ reads

    def load(self) -> dict[str, LoadedEnv]:
        """Every environment with a snapshot, log rows or meta, as committed.

        One query per table inside one read transaction, so a concurrent compaction cannot
        tear the view. Call at startup, before enqueueing: queued writes are not included.
        """
        envs: dict[str, LoadedEnv] = {}
        uptos: dict[str, int] = {}
        with self._read() as r:
            for env_id, upto, blob in r.execute("SELECT env_id, upto, blob FROM snapshots"):
                envs[env_id] = LoadedEnv(updates=[blob])
                uptos[env_id] = upto
            for seq, env_id, blob in r.execute("SELECT seq, env_id, blob FROM log ORDER BY seq"):
                if seq <= uptos.get(env_id, 0):
                    continue  # covered by the snapshot (cannot happen; compaction is atomic)
                env = envs.get(env_id)
                if env is None:
                    env = envs[env_id] = LoadedEnv()
                env.updates.append(blob)
            for env_id, meta in r.execute("SELECT env_id, meta FROM env_meta"):
                env = envs.get(env_id)
                if env is None:
                    env = envs[env_id] = LoadedEnv()
                env.meta = _decode_map(meta, f"meta of {env_id!r}")
        return envs

    def updates_of(self, env_id: str) -> list[bytes]:
        """What rebuilds `env_id`'s document as it is stored and queued right now: the committed
        snapshot and log rows, then the writes still queued or being written.

        Lets a caller roll a document back after a write failed half-way without keeping a copy
        of every document. A write committed while this reads may be listed twice, which is
        harmless for Yjs updates; a queued delete hides everything before it. A write being
        retried is queued, so it is listed; one that failed for good is not.
        """
        with self._cond:
            queued = [*(self._inflight or ()), *self._queue]
        mine = [
            op for op in queued if op.key == env_id and op.kind in ("append", "compact", "delete")
        ]
        last_delete = max((i for i, op in enumerate(mine) if op.kind == "delete"), default=-1)
        pending = [op.blob for op in mine[last_delete + 1 :] if op.blob is not None]
        if last_delete >= 0:
            return pending
        with self._read() as r:
            stored = [
                blob
                for (blob,) in r.execute("SELECT blob FROM snapshots WHERE env_id = ?", (env_id,))
            ]
            stored += [
                blob
                for (blob,) in r.execute(
                    "SELECT blob FROM log WHERE env_id = ? ORDER BY seq", (env_id,)
                )
            ]
        return stored + pending

    def sizes(self) -> dict[str, tuple[int, int, int]]:
        """id -> (snapshot bytes, log rows, log bytes) of every stored env, committed, without
        reading their content: what lets a caller load documents only when they are used."""
        out: dict[str, tuple[int, int, int]] = {}
        with self._read() as r:
            for env_id, nbytes in r.execute("SELECT env_id, length(blob) FROM snapshots"):
                out[env_id] = (nbytes, 0, 0)
            for env_id, rows, nbytes in r.execute(
                "SELECT env_id, count(*), sum(length(blob)) FROM log GROUP BY env_id"
            ):
                out[env_id] = (out.get(env_id, (0, 0, 0))[0], rows, nbytes)
            for (env_id,) in r.execute("SELECT env_id FROM env_meta"):
                out.setdefault(env_id, (0, 0, 0))
        return out

    def index(self) -> dict[str, tuple[int | None, int | None, dict | None]]:
        """id -> (snapshot upto, newest log seq, meta) of every stored doc, committed, without
        reading updates. The two marks say which stored state the meta was written for: any
        later append, or a compaction of one, changes them (see `marks`). A meta that cannot be
        decoded is None (it only ever describes: the updates are what counts)."""
        out: dict[str, tuple[int | None, int | None, dict | None]] = {}
        with self._read() as r:
            for env_id, upto in r.execute("SELECT env_id, upto FROM snapshots"):
                out[env_id] = (upto, None, None)
            for env_id, seq in r.execute("SELECT env_id, max(seq) FROM log GROUP BY env_id"):
                out[env_id] = (out.get(env_id, (None, None, None))[0], seq, None)
            for env_id, blob in r.execute("SELECT env_id, meta FROM env_meta"):
                try:
                    meta: dict | None = _decode_map(blob, f"meta of {env_id!r}")
                except StoreError:
                    meta = None
                upto, seq, _ = out.get(env_id, (None, None, None))
                out[env_id] = (upto, seq, meta)
        return out

    def marks(self, env_id: str) -> tuple[int | None, int | None] | None:
        """`env_id`'s (snapshot upto, newest log seq) as committed, as `index` reads them; None
        while an append, compaction or delete of it is queued or being written (not final)."""
        with self._cond:
            queued = [*(self._inflight or ()), *self._queue]
        if any(op.key == env_id and op.kind in ("append", "compact", "delete") for op in queued):
            return None
        with self._read() as r:
            snap = r.execute("SELECT upto FROM snapshots WHERE env_id = ?", (env_id,)).fetchone()
            (seq,) = r.execute("SELECT max(seq) FROM log WHERE env_id = ?", (env_id,)).fetchone()
        return (snap[0] if snap else None, seq)

    def load_prefixed(self, prefix: str) -> dict[str, LoadedEnv]:
        """`load`, of the docs whose id starts with `prefix` only (`space:`, `files:`): a
        service that keeps those in memory reads none of the environments' updates."""
        envs: dict[str, LoadedEnv] = {}
        uptos: dict[str, int] = {}
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # ids in [prefix, end) start with it
        with self._read() as r:
            for env_id, upto, blob in r.execute(
                "SELECT env_id, upto, blob FROM snapshots WHERE env_id >= ? AND env_id < ?",
                (prefix, end),
            ):
                envs[env_id] = LoadedEnv(updates=[blob])
                uptos[env_id] = upto
            for seq, env_id, blob in r.execute(
                "SELECT seq, env_id, blob FROM log WHERE env_id >= ? AND env_id < ? ORDER BY seq",
                (prefix, end),
            ):
                if seq <= uptos.get(env_id, 0):
                    continue
                envs.setdefault(env_id, LoadedEnv()).updates.append(blob)
            for env_id, meta in r.execute(
                "SELECT env_id, meta FROM env_meta WHERE env_id >= ? AND env_id < ?",
                (prefix, end),
            ):
                envs.setdefault(env_id, LoadedEnv()).meta = _decode_map(meta, f"meta of {env_id!r}")
        return envs

    def needs_compaction(self, env_id: str) -> bool:
        """Whether the log since the last snapshot reached a threshold, counting what is
        enqueued (not only committed), so the caller can compact under sustained load."""
        c = self._counts.get(env_id)
        return c is not None and (c.rows >= self.compact_count or c.bytes >= self.compact_bytes)

    def stats(self) -> dict:
        """Committed totals plus writer counters since open."""
        with self._read() as r:
            n_envs = r.execute(
                "SELECT count(*) FROM (SELECT env_id FROM log UNION SELECT env_id FROM snapshots"
                " UNION SELECT env_id FROM env_meta)"
            ).fetchone()[0]
            log_rows, log_bytes = r.execute(
                "SELECT count(*), coalesce(sum(length(blob)), 0) FROM log"
            ).fetchone()
            snap_bytes = r.execute(
                "SELECT coalesce(sum(length(blob)), 0) FROM snapshots"
            ).fetchone()[0]
        return {
            "environments": n_envs,
            "log_rows": log_rows,
            "log_bytes": log_bytes,
            "snapshot_bytes": snap_bytes,
            "db_bytes": self._db_bytes(),
            "commits": self._commits,
            "batched_writes": self._batched_writes,
            "failed_writes": self._failed_writes,
            "queued": len(self._queue),
            "error": self._error,
            "incremental_vacuum": self.incremental_vacuum,
            "vacuumed_pages": self._vacuumed_pages,
        }

    def env_stats(self, env_id: str) -> dict:
        """Committed size of one environment, plus the enqueued rows/bytes since its snapshot."""
        with self._read() as r:
            log_rows, log_bytes = r.execute(
                "SELECT count(*), coalesce(sum(length(blob)), 0) FROM log WHERE env_id = ?",
                (env_id,),
            ).fetchone()
            snap = r.execute(
                "SELECT upto, length(blob) FROM snapshots WHERE env_id = ?", (env_id,)
            ).fetchone()
            has_meta = (
                r.execute("SELECT 1 FROM env_meta WHERE env_id = ?", (env_id,)).fetchone()
                is not None
            )
        c = self._counts.get(env_id) or _Counts()
        return {
            "log_rows": log_rows,
            "log_bytes": log_bytes,
            "snapshot_bytes": snap[1] if snap else 0,
            "snapshot_upto": snap[0] if snap else None,
            "has_meta": has_meta,
            "rows_since_snapshot": c.rows,
            "bytes_since_snapshot": c.bytes,
        }

    def history_rows(self, env_id: str | None = None) -> list[HistoryRow]:
        """Committed versions (of one environment, or of all), oldest first, without content."""
        sql = (
            "SELECT env_id, version, time, reason, info, digest, length(blob) FROM history"
            + (" WHERE env_id = ?" if env_id is not None else "")
            + " ORDER BY env_id, version"
        )
        with self._read() as r:
            rows = r.execute(sql, (env_id,) if env_id is not None else ()).fetchall()
        return [
            HistoryRow(e, v, t, reason, _decode_map(info, f"history of {e!r}"), digest, size)
            for e, v, t, reason, info, digest, size in rows
        ]

    def history_heads(self) -> dict[str, tuple[int, bytes]]:
        """env id -> (newest committed version, its digest)."""
        with self._read() as r:
            return {
                env_id: (version, digest)
                for env_id, version, digest in r.execute(
                    "SELECT h.env_id, h.version, h.digest FROM history h JOIN"
                    " (SELECT env_id, max(version) AS v FROM history GROUP BY env_id) m"
                    " ON h.env_id = m.env_id AND h.version = m.v"
                )
            }

    def history_blob(self, env_id: str, version: int) -> bytes | None:
        """The compressed JSON of one committed version, or None."""
        with self._read() as r:
            row = r.execute(
                "SELECT blob FROM history WHERE env_id = ? AND version = ?", (env_id, version)
            ).fetchone()
        return row[0] if row else None

    def trash_rows(self) -> list[TrashRow]:
        """Committed trash entries, oldest first, without content."""
        with self._read() as r:
            rows = r.execute(
                "SELECT env_id, time, info, length(blob) FROM trash ORDER BY time, env_id"
            ).fetchall()
        return [TrashRow(e, t, _decode_map(info, f"trash of {e!r}"), n) for e, t, info, n in rows]

    def trash_blob(self, env_id: str) -> bytes | None:
        """The compressed JSON of `env_id`'s trash entry, or None."""
        with self._read() as r:
            row = r.execute("SELECT blob FROM trash WHERE env_id = ?", (env_id,)).fetchone()
        return row[0] if row else None

    def history_stats(self) -> dict:
        """Rows and bytes of the history and the trash, committed."""
        with self._read() as r:
            versions, hbytes = r.execute(
                "SELECT count(*), coalesce(sum(length(blob)), 0) FROM history"
            ).fetchone()
            trashed, tbytes = r.execute(
                "SELECT count(*), coalesce(sum(length(blob)), 0) FROM trash"
            ).fetchone()
        return {
            "versions": versions,
            "history_bytes": hbytes,
            "trashed": trashed,
            "trash_bytes": tbytes,
        }

    def get_setting(self, key: str, default: Any = None) -> Any:
        """The latest value put for `key`, including puts not yet committed."""
        return self._settings.get(key, default)

    # ------------------------------------------------------------------ writes

    def enqueue_append(self, env_id: str, update: bytes) -> Ticket:
        """Queue one update for `env_id`; the log keeps enqueue order."""
        blob = bytes(update)
        seq = self._next_seq
        self._next_seq += 1
        ticket = Ticket(seq)
        self._push(_Op("append", env_id, blob, seq, ticket))
        c = self._counts.get(env_id)
        if c is None:
            c = self._counts[env_id] = _Counts()
        c.rows += 1
        c.bytes += len(blob)
        return ticket

    def enqueue_meta(self, env_id: str, meta: dict) -> Ticket:
        """Queue a replacement of `env_id`'s metadata (CBOR-encoded now, so errors are sync)."""
        if not isinstance(meta, dict):
            raise StoreError(f"meta must be a dict, not {type(meta).__name__}")
        return self._push(_Op("meta", env_id, _encode(meta), 0, Ticket()))

    def enqueue_delete(self, env_id: str) -> Ticket:
        """Queue removal of `env_id`'s log, snapshot and meta (appends queued later survive)."""
        ticket = self._push(_Op("delete", env_id, None, 0, Ticket()))
        self._counts.pop(env_id, None)
        return ticket

    def enqueue_compact(self, env_id: str, snapshot: bytes) -> Ticket:
        """Queue `snapshot` (the full state as of now) to replace the older snapshot and every
        log row of `env_id` enqueued before this call, atomically. Later appends are kept."""
        ticket = self._push(_Op("compact", env_id, bytes(snapshot), self._next_seq - 1, Ticket()))
        self._counts[env_id] = _Counts()
        return ticket

    def enqueue_version(
        self,
        env_id: str,
        version: int,
        when: float,
        reason: str,
        info: dict,
        digest: bytes,
        blob: bytes,
    ) -> Ticket:
        """Queue one version of `env_id`'s history (`blob`: its JSON, compressed by the caller)."""
        row = (int(version), float(when), str(reason), _encode(info), bytes(digest))
        return self._push(_Op("version", env_id, bytes(blob), 0, Ticket(), row))

    def enqueue_prune(self, env_id: str, versions: Iterable[int]) -> Ticket:
        """Queue the removal of these versions of `env_id`'s history."""
        return self._push(_Op("prune", env_id, None, 0, Ticket(), tuple(int(v) for v in versions)))

    def enqueue_trash(self, env_id: str, when: float, info: dict, blob: bytes) -> Ticket:
        """Queue `env_id`'s last content into the trash (replacing an older entry of that id)."""
        return self._push(
            _Op("trash", env_id, bytes(blob), 0, Ticket(), (float(when), _encode(info)))
        )

    def enqueue_untrash(self, env_id: str) -> Ticket:
        """Queue the removal of `env_id`'s trash entry (restored, or expired)."""
        return self._push(_Op("untrash", env_id, None, 0, Ticket()))

    def put_setting(self, key: str, value: Any) -> Ticket:
        """Queue a CBOR value for `key`; `get_setting` sees it immediately."""
        blob = _encode(value)
        ticket = self._push(_Op("setting", key, blob, 0, Ticket()))
        self._settings[key] = cbor2.loads(blob)  # a copy, as a reopen would see it
        return ticket

    def _push(self, op: _Op) -> Ticket:
        if self._closed:
            raise StoreError("store is closed")
        if not isinstance(op.key, str):
            raise StoreError(f"key must be str, not {type(op.key).__name__}")
        late = self.wake_late and not self._stop and self._trio_thread == threading.get_ident()
        hold = self._holding and not late
        with self._cond:
            self._queue.append(op)
            if op.kind in _FREEING:
                self._vacuum_due = True
            if not late and not hold:
                self._cond.notify()
        if hold:
            self._held = True
        elif late:
            self._kick_event.set()  # (one wake-up for all that is queued until the kicker runs)
        return op.ticket

    @contextlib.contextmanager
    def wake_after(self) -> Iterator[None]:
        """Enqueues inside wake the writer once, at the end. For a peer's update, whose change
        event and relays come right after the enqueue: a writer woken at the enqueue contends
        for the GIL with them (measured on a LAN hop under load, the wake-up alone took ~0.2 ms
        of the receiving daemon's step). Its ticket completes after COMMIT all the same."""
        if self._holding:
            yield
            return
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._held:
                self._held = False
                with self._cond:
                    self._cond.notify()

    async def _kicker(self) -> None:
        """Wake the writer for what the trio thread queued, `LATE_GATHER` after the first of it
        (see the module's docstring)."""
        while True:
            await self._kick_event.wait()
            await trio.sleep(LATE_GATHER)
            self._kick_event = trio.Event()
            with self._cond:
                self._cond.notify()

    # ------------------------------------------------------------------ writer service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit writer. Run it in the daemon's nursery; cancel it to shut down.

        It lives in a thread of its own for as long as this runs. On cancellation it writes
        everything still queued (one attempt each, including what other tasks' cleanup enqueues
        meanwhile) before re-raising, so nothing enqueued before shutdown is dropped. A failed
        batch fails its tickets and the writer goes on.
        """
        if self._running:
            raise RuntimeError("Store.run() is already running")
        if self._closed:
            raise StoreError("store is closed")
        self._running = True
        self._stop = False
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                if self.wake_late:
                    nursery.start_soon(self._kicker)
                with trio.CancelScope(shield=True):  # the thread returns once told to
                    await trio.to_thread.run_sync(self._writer, limiter=trio.CapacityLimiter(1))
                nursery.cancel_scope.cancel()
        finally:
            self._trio_thread = None
            self._take_written()  # (already posted, but run() returns with them completed)
            self._running = False
            if self._settled is not None:  # nothing more will be written by this writer
                self._settled.set()
                self._settled = None

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
                migrating = self._migrating
            if migrating:  # the one-time VACUUM: stop it (it runs again at the next start)
                self._db.interrupt()  # (thread-safe; it rolls back)

    async def settled(self) -> None:
        """Until the running writer has written everything queued and given back the free
        pages (tests and benchmarks: the file's size is final then)."""
        if not self._running:
            raise StoreError("the writer is not running")
        if self._settled is None:
            self._settled = trio.Event()
        settled = self._settled
        with self._cond:
            self._settle_wanted = True  # have the writer say when it is idle
            self._cond.notify()
        await settled.wait()

    def _writer(self) -> None:
        """The writer thread: write batches as they are queued, retry, give space back."""
        with self._cond:
            if self._closed:
                return
            self._no_writer.clear()
        try:
            if not self.incremental_vacuum:
                self._migrate_vacuum()
            while True:
                with self._cond:
                    ops = self._next_job()
                    if ops is None:
                        return
                    self._inflight = ops or None
                if not ops:
                    self._vacuum_step()
                elif self._write(ops):
                    if self._vacuum_due and self.incremental_vacuum:  # never idle: now and then
                        self._vacuum_batches += 1
                        if self._vacuum_batches >= VACUUM_EVERY_BATCHES and not self._stop:
                            self._vacuum_step()
                else:  # failed (and back in the queue, unless stopping): let the disk recover
                    with self._cond:
                        self._cond.wait_for(lambda: self._stop or self._closed, self._retry_delay)
        finally:
            self._no_writer.set()

    def _next_job(self) -> list[_Op] | None:
        """Writer thread, holding `_cond`: wait for the next batch; [] for a vacuum step, None
        to return (closed, or stopping with nothing queued)."""
        while True:
            if self._closed:
                return None
            if self._queue:
                return self._take_batch()
            if self._stop:
                return None
            if self._vacuum_due and self.incremental_vacuum and not self._retry_delay:
                if self._vacuum_running or self._settle_wanted:
                    return []
                # start a run once nothing was enqueued for VACUUM_IDLE seconds
                deadline = time.monotonic() + VACUUM_IDLE
                while not (self._queue or self._stop or self._closed or self._settle_wanted):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return []
                    self._cond.wait(left)
                continue
            if self._settle_wanted:
                self._settle_wanted = False
                self._post(None)
            self._cond.wait()

    def _write(self, ops: list[_Op]) -> bool:
        """Writer thread: commit one batch and hand it to the trio thread; False if it failed."""
        started = time.perf_counter()
        with self._db_lock:
            outcome = self._apply_batch_safe(ops)
        seconds = time.perf_counter() - started
        if not isinstance(outcome, BaseException):
            if self._retry_delay:
                log.warning("store: writes succeed again (%s is over)", self._last_error)
            self._retry_delay = 0.0
            with self._cond:
                self._inflight = None
                self._post(_Written(ops, outcome, False, seconds))
            return True
        with self._cond:
            # The callers' documents hold these changes: they go back ahead of anything
            # enqueued later, unless this is the last attempt (closing or stopping).
            requeue = _transient(outcome) and not (self._closed or self._stop)
            if requeue:
                self._last_error = str(outcome)
                log.log(
                    logging.DEBUG if self._retry_delay else logging.ERROR,  # once per outage
                    "store: %d writes failed (%s); kept in memory, trying again",
                    len(ops),
                    outcome,
                )
                self._queue.extendleft(reversed(ops))
            self._retry_delay = min(max(self._retry_delay * 2, RETRY_INITIAL), RETRY_MAX)
            self._inflight = None
            self._post(_Written(ops, outcome, requeue, seconds))
        return False

    def _post(self, item: _Written | None) -> None:
        """Writer thread, holding `_cond`: hand `item` to the trio thread, with one wake-up for
        whatever piles up before it runs."""
        self._written.append(item)
        if self._written_posted or self._token is None:
            return
        try:
            self._token.run_sync_soon(self._take_written)
            self._written_posted = True
        except trio.RunFinishedError:  # (cannot happen while run() waits) close() takes them
            pass

    def _take_written(self) -> None:
        """Trio thread: complete the tickets of the batches the writer is done with, in order
        (a callback of `run_sync_soon`: it must not raise)."""
        with self._cond:
            items, self._written = self._written, []
            self._written_posted = False
        for item in items:
            try:
                if item is None:
                    self._writer_idle()
                else:
                    self.commit_times.observe(item.seconds)
                    self._finish_batch(item)
            except Exception:
                log.exception("store: completing written batch failed")

    def _writer_idle(self) -> None:
        """Trio thread: the writer found nothing to do; `settled()` returns unless something
        was queued since (then the writer says so again once that is written)."""
        if self._settled is None:
            return
        with self._cond:
            if self._queue or self._inflight or self._written:
                self._settle_wanted = True
                self._cond.notify()
                return
        self._settled.set()
        self._settled = None

    # ------------------------------------------------------------------ giving space back

    def _migrate_vacuum(self) -> None:
        """Writer thread: rebuild a database made without incremental vacuum (the only way to
        turn it on).

        It takes about as long as writing the file once (~1 s per 100 MB here) and needs as
        much free space again; writes queue meanwhile. Atomic like any transaction: a crash or
        a failure (a full disk) leaves the old file, and the next start tries again. Shutdown
        interrupts it (`close()`, or run() cancelled)."""
        with self._cond:
            if self._closed or self._stop:
                return
            self._migrating = True
        size = self._db_bytes()
        log.info("store: converting %s (%d MB) to give space back; once", self.db_path, size >> 20)
        started = time.perf_counter()
        try:
            error = self._vacuum_whole()
        finally:
            with self._cond:
                self._migrating = False
        if error is not None:
            log.warning("store: not converted (%s); trying again at the next start", error)
            return
        self.incremental_vacuum = True
        log.info("store: converted in %.1f s", time.perf_counter() - started)

    def _vacuum_whole(self) -> str | None:
        """Writer thread: the one-time VACUUM; why it failed, or None."""
        with self._db_lock:
            if self._db_closed:
                return "store closed"
            try:
                self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                self._db.execute("VACUUM")
                return None if _auto_vacuum(self._db) == _INCREMENTAL else "mode unchanged"
            except sqlite3.Error as e:
                return str(e)

    def _vacuum_step(self) -> None:
        """Writer thread: give back up to `VACUUM_STEP_PAGES` free pages in a transaction of
        their own."""
        with self._cond:
            self._vacuum_batches = 0
            self._vacuum_due = False  # a freeing write enqueued meanwhile sets it again
        more = self._vacuum_some()
        with self._cond:
            self._vacuum_running = more
            self._vacuum_due = self._vacuum_due or more

    def _vacuum_some(self) -> bool:
        """Writer thread: one step; True if free pages remain for another."""
        with self._db_lock:
            if self._db_closed or not self.incremental_vacuum:
                return False
            db = self._db
            try:
                free = db.execute("PRAGMA freelist_count").fetchone()[0]
                if not self._vacuum_running:
                    pages = db.execute("PRAGMA page_count").fetchone()[0]
                    if free < max(VACUUM_MIN_FREE_PAGES, pages // VACUUM_FREE_FRACTION):
                        return False
                elif not free:
                    return False
                pages = min(free, VACUUM_STEP_PAGES)
                # executescript steps the pragma to its end (execute() frees a single page)
                db.executescript(f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({pages}); COMMIT;")
                left = db.execute("PRAGMA freelist_count").fetchone()[0]
                self._vacuumed_pages += max(0, free - left)
                if 0 < left < free:
                    return True
                # done: the file shrank at the checkpoint; empty the WAL too, unless a reader
                # holds it (a short wait: writes may be queuing)
                db.execute("PRAGMA busy_timeout = 200")
                try:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    db.execute("PRAGMA busy_timeout = 10000")
            except sqlite3.Error as e:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                log.warning("store: giving space back failed: %s", e)
            return False

    def _take_batch(self) -> list[_Op]:
        batch: list[_Op] = []
        size = 0
        q = self._queue
        while q and len(batch) < MAX_BATCH_OPS:
            n = len(q[0].blob or b"")
            if batch and size + n > MAX_BATCH_BYTES:
                break
            batch.append(q.popleft())
            size += n
        return batch

    def _apply_batch_safe(self, ops: list[_Op]) -> _Outcome:
        """`_apply_batch`, with a failure of the whole batch returned instead of raised."""
        if self._db_closed:
            return StoreError("store was closed before the write")
        try:
            return self._apply_batch(ops)
        except Exception as e:
            if not _transient(e):  # those are logged once per outage by _finish_batch
                log.exception("store: commit of %d writes failed", len(ops))
            return e

    def _apply_batch(self, batch: list[_Op]) -> list[BaseException | None]:
        """Writer thread: one transaction for the whole batch; returns per-op errors.

        A statement that fails on its own (e.g. a constraint) fails only its op: SQLite rolls
        back just that statement, and multi-statement ops run in a SAVEPOINT. If SQLite instead
        abandoned the whole transaction, a statement fails for a reason that may pass (I/O error,
        disk full), or COMMIT fails, this raises and every op of the batch fails.
        """
        db = self._db
        errors: list[BaseException | None] = [None] * len(batch)
        db.execute("BEGIN IMMEDIATE")
        try:
            for i, op in enumerate(batch):
                multi = op.kind in ("delete", "compact", "prune")
                try:
                    if multi:
                        db.execute("SAVEPOINT op")
                    _APPLY[op.kind](db, op)
                    if multi:
                        db.execute("RELEASE op")
                except sqlite3.Error as e:
                    if not db.in_transaction or _transient(e):
                        raise  # the whole batch fails (and may be tried again)
                    if multi:
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                    errors[i] = e
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("store: rollback failed")
            raise
        return errors

    def _finish_batch(self, written: _Written) -> None:
        """Trio thread: complete a written batch's tickets, in order. A batch that went back to
        the queue gets new tickets (each failed ticket's `retry`) for its next attempt."""
        batch, outcome = written.ops, written.outcome
        if isinstance(outcome, BaseException):
            errors: list[BaseException | None] = [outcome] * len(batch)
            if written.requeued:
                self._error = str(outcome)  # until a batch commits
                for op in batch:  # (the writer never touches tickets: this is safe)
                    failed, op.ticket = op.ticket, Ticket(op.ticket.seq)
                    failed.retry = op.ticket
                    failed._complete(outcome)
                self._failed_writes += len(batch)
                return
            if _transient(outcome):  # (other failures were logged with their traceback)
                log.error("store: %d writes failed for good: %s", len(batch), outcome)
        else:
            errors = outcome
            self._commits += 1
            self._error = None
        failed = 0
        for op, err in zip(batch, errors, strict=True):
            if err is None:
                self._batched_writes += 1
            else:
                failed += 1
                if not isinstance(outcome, BaseException):
                    log.error("store: %s of %r failed: %s", op.kind, op.key, err)
            op.ticket._complete(err)
        if failed:
            self._failed_writes += failed
            self._recount()

    def _recount(self) -> None:
        """After a failure the enqueue-time counters over-count: rebuild them from the
        committed log plus what is still queued."""
        if self._closed:
            return
        try:
            with self._read() as r:
                self._counts = {
                    env_id: _Counts(rows, nbytes)
                    for env_id, rows, nbytes in r.execute(
                        "SELECT env_id, count(*), sum(length(blob)) FROM log GROUP BY env_id"
                    )
                }
        except (sqlite3.Error, StoreError):
            log.exception("store: recount failed")
            return
        with self._cond:
            queued = [*(self._inflight or ()), *self._queue]
        self._replay_counts(queued)

    def _replay_counts(self, ops: Iterable[_Op]) -> None:
        for op in ops:
            if op.kind == "append":
                c = self._counts.setdefault(op.key, _Counts())
                c.rows += 1
                c.bytes += len(op.blob or b"")
            elif op.kind == "compact":
                self._counts[op.key] = _Counts()
            elif op.kind == "delete":
                self._counts.pop(op.key, None)

    # ------------------------------------------------------------------ helpers

    def _read_counters(self) -> None:
        """At open: next seq, per-env counts since snapshot, settings."""
        with self._read() as r:
            max_log = r.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0]
            max_snap = r.execute("SELECT coalesce(max(upto), 0) FROM snapshots").fetchone()[0]
            self._next_seq = max(max_log, max_snap) + 1
            self._counts = {
                env_id: _Counts(rows, nbytes)
                for env_id, rows, nbytes in r.execute(
                    "SELECT env_id, count(*), sum(length(blob)) FROM log GROUP BY env_id"
                )
            }
            self._settings = {
                key: _decode(value, f"setting {key!r}")
                for key, value in r.execute("SELECT key, value FROM settings")
            }

    def _read(self) -> _ReadTxn:
        if self._closed:
            raise StoreError("store is closed")
        return _ReadTxn(self._reader, self._reader_lock)

    def _db_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(str(self.db_path) + suffix)
            except OSError:
                pass
        return total


class _ReadTxn:
    """One read transaction on the query-only connection: a consistent snapshot in WAL mode."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self._conn = conn
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.execute("COMMIT")
        finally:
            self._lock.release()


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: the writer
    # thread and close() share the connection; access is serialised by the Store's locks.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    return conn


_INCREMENTAL = 2  # PRAGMA auto_vacuum: 0 none, 1 full, 2 incremental


def _auto_vacuum(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA auto_vacuum").fetchone()[0])


def _init_writer(db: sqlite3.Connection) -> None:
    # Before anything writes the header (even journal_mode does): takes effect for a new file
    # only; an older one is converted by the writer (`Store._migrate_vacuum`).
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot enable WAL journal mode (got {mode!r})")
    db.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every COMMIT
    db.execute("PRAGMA fullfsync = ON")  # macOS: F_FULLFSYNC, else FULL is not durable there
    db.execute("PRAGMA journal_size_limit = 67108864")  # shrink the WAL back after checkpoints
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {version} is newer than this peerdaemon "
            f"supports ({SCHEMA_VERSION}); upgrade peerdaemon"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _MIGRATIONS[target].split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (disk full)
                db.execute("ROLLBACK")
            raise


def _encode(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as e:
        raise StoreError(f"value is not CBOR-encodable: {e}") from e


def _decode(blob: bytes, what: str) -> Any:
    try:
        return cbor2.loads(blob)
    except (cbor2.CBORDecodeError, ValueError) as e:
        raise StoreError(f"corrupt {what}: {e}") from e


def _decode_map(blob: bytes, what: str) -> dict:
    value = _decode(blob, what)
    if not isinstance(value, dict):
        raise StoreError(f"corrupt {what}: not a map")
    return value


def _apply_append(db: sqlite3.Connection, op: _Op) -> None:
    db.execute("INSERT INTO log (seq, env_id, blob) VALUES (?, ?, ?)", (op.seq, op.key, op.blob))


def _apply_meta(db: sqlite3.Connection, op: _Op) -> None:
    db.execute(
        "INSERT INTO env_meta (env_id, meta) VALUES (?, ?)"
        " ON CONFLICT (env_id) DO UPDATE SET meta = excluded.meta",
        (op.key, op.blob),
    )


def _apply_delete(db: sqlite3.Connection, op: _Op) -> None:
    db.execute("DELETE FROM log WHERE env_id = ?", (op.key,))
    db.execute("DELETE FROM snapshots WHERE env_id = ?", (op.key,))
    db.execute("DELETE FROM env_meta WHERE env_id = ?", (op.key,))


def _apply_compact(db: sqlite3.Connection, op: _Op) -> None:
    db.execute("DELETE FROM log WHERE env_id = ? AND seq <= ?", (op.key, op.seq))
    db.execute(
        "INSERT INTO snapshots (env_id, upto, blob) VALUES (?, ?, ?)"
        " ON CONFLICT (env_id) DO UPDATE SET upto = excluded.upto, blob = excluded.blob",
        (op.key, op.seq, op.blob),
    )


def _apply_setting(db: sqlite3.Connection, op: _Op) -> None:
    db.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (op.key, op.blob),
    )


def _apply_version(db: sqlite3.Connection, op: _Op) -> None:
    version, when, reason, info, digest = op.row
    db.execute(
        "INSERT INTO history (env_id, version, time, reason, info, digest, blob)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (op.key, version, when, reason, info, digest, op.blob),
    )


def _apply_prune(db: sqlite3.Connection, op: _Op) -> None:
    db.executemany(
        "DELETE FROM history WHERE env_id = ? AND version = ?", [(op.key, v) for v in op.row]
    )


def _apply_trash(db: sqlite3.Connection, op: _Op) -> None:
    when, info = op.row
    db.execute(
        "INSERT INTO trash (env_id, time, info, blob) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (env_id) DO UPDATE SET time = excluded.time, info = excluded.info,"
        " blob = excluded.blob",
        (op.key, when, info, op.blob),
    )


def _apply_untrash(db: sqlite3.Connection, op: _Op) -> None:
    db.execute("DELETE FROM trash WHERE env_id = ?", (op.key,))


_APPLY = {
    "version": _apply_version,
    "prune": _apply_prune,
    "trash": _apply_trash,
    "untrash": _apply_untrash,
    "append": _apply_append,
    "meta": _apply_meta,
    "delete": _apply_delete,
    "compact": _apply_compact,
    "setting": _apply_setting,
}
