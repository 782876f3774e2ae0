"""DocStore: the cluster's documents in PostgreSQL (psycopg 3, in worker threads under trio).

What it promises (docs/hub-cluster.md, "Accepted"): an update whose `append` ticket returned is
committed in PostgreSQL, and stays there through the kill -9 of any hub process, a Redis that
restarts empty and a PostgreSQL restart; a compaction folds a document's rows into its snapshot
and deletes them in one transaction, so a crash leaves either the rows or the snapshot that
holds them.

Appends are group-committed as the SQLite store's are: `append()` queues (synchronously, in
order, from the trio thread) and the writer (`run()`) inserts whatever is queued in one
transaction. While PostgreSQL is away (a restart, a failover) the writer keeps the queue, in
order, and tries again until it is back: nothing queued is dropped. If the connection breaks
after COMMIT was sent, the batch may be written twice; a Yjs update applied twice changes
nothing, and the next compaction folds the copies away.

psycopg's async connection runs on asyncio only; its sync connection runs here in worker
threads (one call at a time per connection). A trio cancellation does not wait for the
thread: the query is cancelled on the server (`cancel_safe`, from a thread of its own) and
the connection is used again only once that thread has finished.

`reserve_env`/`release_env` are the exception, called synchronously on the trio thread by
`ClusterDocs` when a process creates an environment: `envs_per_space` must be decided before
the document changes, and one short statement (p50 about 0.3 ms) on a rare path costs less than
holding the update while a thread asks. Such a call goes through `_Connection.run_bounded`: a
server that stops answering (stopped, or a network that drops packets without a reset) holds
up the event loop for at most its bound once, and not again while that call is stuck.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import cbor2
import psycopg
import trio
from pycrdt import Doc, merge_updates

from ...model.yupdate import Malformed, read_items, read_state_vector
from .protocol import room_of
from .schema import LOCK_ID, MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "RESERVATION_GRACE",
    "AppendTicket",
    "Bounded",
    "DocStore",
    "DocStoreError",
    "KEEPALIVES",
    "Loaded",
    "cancel_quietly",
    "fold_updates",
    "env_reservations",
    "migrate",
    "release_env",
    "reserve_env",
]

log = logging.getLogger("peerdaemon.hub.cluster.store")

T = TypeVar("T")


class DocStoreError(Exception):
    """PostgreSQL refused or is unreachable; for a load or a compaction the caller retries."""


def fold_updates(updates: Sequence[bytes]) -> bytes:
    """One Yjs update holding all of `updates`: applied to a new document, so deleted content
    is garbage-collected (merging the updates would keep it), unless an update waits for one
    not among them (another process's row not committed yet: a smaller seq can commit after
    a larger one). A document leaves such structs out of its state, so then the updates are
    merged as they are, losing nothing; the next compaction garbage-collects."""
    doc: Doc = Doc()
    for update in updates:
        doc.apply_update(update)
    snapshot = doc.get_update()
    state = read_state_vector(doc.get_state())
    try:
        for update in updates:
            for item in read_items(update):
                if state.get(item.client, 0) < item.clock + item.length:
                    return merge_updates(*updates)
    except Malformed:
        return merge_updates(*updates)
    return snapshot


KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,
}
"""libpq's connection settings for every connection of a hub process: a server whose machine
is gone (no reset ever comes) ends a call in seconds, not after the kernel's 15-minute
retransmission timeout."""


def cancel_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Cancel `conn`'s query on the server (from a thread: it may block up to 5 s)."""
    if conn is not None and not conn.closed:
        try:
            conn.cancel_safe(timeout=5.0)
        except Exception:  # it is gone already, or the server is: nothing to cancel
            pass


class Bounded:
    """Blocking calls made from the trio thread itself, each waited for at most a bound.

    A call to a server that stopped answering (stopped, or a network that drops packets
    without a reset) does not return: it goes on in a daemon thread of its own (one that never
    returns must not hold up the process's exit), and the event loop goes on after the bound.
    While it is stuck, the next call fails at once instead of waiting its bound again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stuck: threading.Event | None = None

    @property
    def stuck(self) -> bool:
        """Whether a call that ran out has not returned yet."""
        return self._stuck is not None and not self._stuck.is_set()

    def run(
        self, fn: Callable[[], T], timeout: float, on_timeout: Callable[[], None] | None = None
    ) -> T:
        """`fn()`'s result or exception; TimeoutError past `timeout` (then `on_timeout()` runs
        in a thread of its own: a cancel that may block too)."""
        if self.stuck:
            raise TimeoutError("an earlier call has not returned yet")
        done = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed over to the trio thread, if it still waits
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name=self.name, daemon=True).start()
        if not done.wait(timeout):
            self._stuck = done
            if on_timeout is not None:
                threading.Thread(target=on_timeout, name=f"{self.name}-cancel", daemon=True).start()
            raise TimeoutError(f"no answer within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]


class _Connection:
    """One psycopg connection, used from worker threads one call at a time; reconnects on the
    next call after it broke."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, name: str = "") -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.name = name
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # held by the thread using the connection
        self._bounded = Bounded(f"pg-{name}")

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.dsn,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name=f"peerdaemon-hub {self.name}".strip(),
                autocommit=True,  # transactions are explicit: `conn.transaction()`
                **KEEPALIVES,
            )
        return self._conn

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._lock:
            reused = self._conn is not None and not self._conn.closed
            try:
                return self._attempt(fn)
            except psycopg.OperationalError:
                if not reused or self._conn is not None:
                    raise
            # the connection had died while idle (a PostgreSQL restart): once more on a new
            # one. Every call is one transaction, so trying it again is safe.
            return self._attempt(fn)

    def _attempt(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = self._connection()
        try:
            return fn(conn)
        except psycopg.Error:
            if conn.closed or conn.broken:
                self._conn = None
            raise

    def _cancel(self) -> None:
        cancel_quietly(self._conn)

    def run_bounded(self, fn: Callable[[psycopg.Connection[Any]], T], timeout: float) -> T:
        """`fn(connection)` for the trio thread itself, waited for at most `timeout` s
        (DocStoreError past it, or at once while an earlier call that ran out is stuck); the
        query that ran out is cancelled on the server."""
        try:
            return self._bounded.run(lambda: self._run(fn), timeout, self._cancel)
        except TimeoutError as exc:
            raise DocStoreError(f"postgresql: {exc}") from None
        except psycopg.Error as exc:
            raise DocStoreError(f"postgresql: {exc}".strip()) from exc

    async def call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`fn(connection)` in a worker thread; psycopg's errors come out as DocStoreError."""
        try:
            return await trio.to_thread.run_sync(self._run, fn, abandon_on_cancel=True)
        except trio.Cancelled:
            trio.lowlevel.start_thread_soon(self._cancel, lambda _outcome: None)
            raise
        except psycopg.Error as exc:
            raise DocStoreError(f"postgresql: {exc}".strip()) from exc

    def close(self) -> None:
        # a call stuck on a server that does not answer holds the lock: its connection goes
        # with the process
        if not self._lock.acquire(timeout=1.0):
            return
        try:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        finally:
            self._lock.release()


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema to `SCHEMA_VERSION` (one transaction per step, serialized across
    processes by an advisory lock); -> the version found. Refuses a newer schema."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise DocStoreError(
                f"the database's schema is version {found}, newer than this hub's"
                f" ({SCHEMA_VERSION}): upgrade peerdaemon"
            )
        for version in sorted(v for v in MIGRATIONS if v > found):
            conn.execute(MIGRATIONS[version].encode())
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found


@dataclass
class Loaded:
    """A document as stored: apply `updates` in order (the snapshot first, if any)."""

    updates: list[bytes]
    version: int  # compactions so far
    size: int  # bytes: the snapshot and the rows left (what `bytes_per_env` limits)
    rows: int  # rows not compacted yet


class AppendTicket:
    """One queued append: `await wait()` returns once it is committed (DocStoreError if it
    was refused for good, as bad input; an unreachable PostgreSQL is waited out)."""

    __slots__ = ("_done", "error", "space", "doc", "update", "origin")

    def __init__(self, space: str, doc: str, update: bytes, origin: str) -> None:
        self.space = space
        self.doc = doc
        self.update = update
        self.origin = origin
        self._done = trio.Event()
        self.error: DocStoreError | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> None:
        await self._done.wait()
        if self.error is not None:
            raise self.error

    def _finish(self, error: DocStoreError | None = None) -> None:
        self.error = error
        self._done.set()


class DocStore:
    """Documents (updates + snapshots) and settings in PostgreSQL, shared by every hub process.

    `open()` migrates; `run()` is the writer (start it in a nursery); `append` queues; `load`,
    `compact`, `sizes` and the settings go through a second connection, so a large load never
    holds up a commit.
    """

    def __init__(self, dsn: str, *, retry: float = 0.2, batch_max: int = 2000) -> None:
        self.dsn = dsn
        self.retry = retry
        self.batch_max = batch_max
        self._writer = _Connection(dsn, name="writer")
        self._reader = _Connection(dsn, name="reader")
        self._queue: deque[AppendTicket] = deque()
        self._wakeup = trio.Event()
        self.commits = 0
        self.failures = 0  # batches that had to be tried again
        self.on_commit: Callable[[float], None] | None = None
        """Told how long each committed batch took, waits for an unreachable server included."""

    async def open(self) -> int:
        """Connect and migrate; -> the schema version found before."""
        return await self._reader.call(migrate)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    # -- appends ---------------------------------------------------------------------------------
    def append(self, space: str, doc: str, update: bytes, origin: str = "") -> AppendTicket:
        """Queue one update (ValueError on bad ids); the writer commits it with what is queued."""
        room_of(space, doc)
        ticket = AppendTicket(space, doc, bytes(update), origin)
        self._queue.append(ticket)
        self._wakeup.set()
        return ticket

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            batch = [self._queue[i] for i in range(min(len(self._queue), self.batch_max))]
            error = await self._commit(batch)
            for _ in batch:
                self._queue.popleft()
            for ticket in batch:
                ticket._finish(error)

    async def _commit(self, batch: list[AppendTicket]) -> DocStoreError | None:
        """Insert the batch in one transaction; wait out an unreachable server."""
        started = trio.current_time()
        while True:
            try:
                await self._writer.call(lambda conn: _insert(conn, batch))
            except DocStoreError as exc:
                cause = exc.__cause__
                if isinstance(cause, psycopg.OperationalError):
                    self.failures += 1
                    log.warning(
                        "hub: postgresql unavailable, %d update(s) wait: %s", len(batch), exc
                    )
                    await trio.sleep(self.retry)
                    continue
                log.error("hub: postgresql refused %d update(s): %s", len(batch), exc)
                return exc
            self.commits += 1
            if self.on_commit is not None:
                self.on_commit(trio.current_time() - started)
            return None

    # -- reads and compaction --------------------------------------------------------------------
    async def load(self, space: str, doc: str) -> Loaded | None:
        """The document as committed (None: never stored)."""
        room_of(space, doc)
        return await self._reader.call(lambda conn: _load(conn, space, doc))

    async def compact(
        self, space: str, doc: str, fold: Callable[[Sequence[bytes]], bytes] = fold_updates
    ) -> int:
        """Fold the snapshot and every row into a new snapshot and delete those rows, in one
        transaction; -> rows folded. Rows appended meanwhile stay for the next time."""
        room_of(space, doc)
        return await self._reader.call(lambda conn: _compact(conn, space, doc, fold))

    async def sizes(self) -> dict[tuple[str, str], int]:
        """Every document's stored bytes (snapshot + rows), without reading a blob."""
        return await self._reader.call(_sizes)

    async def get_setting(self, key: str) -> Any:
        def read(conn: psycopg.Connection[Any]) -> Any:
            row = conn.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone()
            return cbor2.loads(row[0]) if row else None

        return await self._reader.call(read)

    async def put_setting(self, key: str, value: Any) -> None:
        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO settings (key, value) VALUES (%s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, cbor2.dumps(value)),
                )

        await self._reader.call(write)

    async def accounts_version(self) -> int:
        def read(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT version FROM accounts_version").fetchone()
            return int(row[0]) if row else 0

        return await self._reader.call(read)

    async def sql(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `fn(connection)` on the reader's connection (tests, admin paths)."""
        return await self._reader.call(fn)


def _insert(conn: psycopg.Connection[Any], batch: list[AppendTicket]) -> None:
    docs = sorted({(t.space, t.doc) for t in batch})
    with conn.transaction():
        conn.execute(
            "INSERT INTO documents (space, doc)"
            " SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING",
            ([s for s, _ in docs], [d for _, d in docs]),
        )
        conn.execute(
            "INSERT INTO doc_updates (space, doc, blob, origin)"
            " SELECT space, doc, blob, origin FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[])"
            " WITH ORDINALITY AS u(space, doc, blob, origin, n) ORDER BY n",
            (
                [t.space for t in batch],
                [t.doc for t in batch],
                [t.update for t in batch],
                [t.origin for t in batch],
            ),
        )


RESERVATION_GRACE = 600.0
"""Seconds after which a place reserved for an environment that was never stored may be given
back to a full space (its process died before the first commit): far past any commit while
PostgreSQL answers."""


def reserve_env(
    conn: psycopg.Connection[Any],
    space: str,
    doc: str,
    limit: int,
    known: int = 0,
    grace: float = RESERVATION_GRACE,
) -> tuple[bool, int]:
    """Take a place for environment `doc` in `space` (kept if it has one): -> (reserved, the
    environments the space holds with it). Atomic across processes (schema.py's `reserve_env`:
    a per-space lock, count, insert, in one round trip); `known` is what the caller counts
    itself, in case PostgreSQL has less (documents created while it was away)."""
    row = conn.execute(
        "SELECT reserved, held FROM reserve_env(%s, %s, %s, %s, %s)",
        (space, doc, limit, known, grace),
    ).fetchone()
    assert row is not None
    return bool(row[0]), int(row[1])


def release_env(conn: psycopg.Connection[Any], space: str, doc: str) -> None:
    """Give back a place `reserve_env` took for a document that was not created after all
    (kept while another process holds it too, or the document is stored)."""
    conn.execute("SELECT release_env(%s, %s)", (space, doc))


def env_reservations(conn: psycopg.Connection[Any], space: str) -> set[str]:
    """The environments `space` holds a place for (tests, tools)."""
    rows = conn.execute("SELECT doc FROM env_reservations WHERE space = %s", (space,)).fetchall()
    return {str(r[0]) for r in rows}


def _load(conn: psycopg.Connection[Any], space: str, doc: str) -> Loaded | None:
    with conn.transaction():  # one snapshot of both tables (REPEATABLE READ below)
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute(
            "SELECT snapshot, version FROM documents WHERE space = %s AND doc = %s", (space, doc)
        ).fetchone()
        if row is None:
            return None
        blobs = [
            bytes(r[0])
            for r in conn.execute(
                "SELECT blob FROM doc_updates WHERE space = %s AND doc = %s ORDER BY seq",
                (space, doc),
            )
        ]
    snapshot = bytes(row[0]) if row[0] is not None else None
    updates = ([snapshot] if snapshot else []) + blobs
    return Loaded(updates, int(row[1]), sum(map(len, updates)), len(blobs))


def _compact(
    conn: psycopg.Connection[Any],
    space: str,
    doc: str,
    fold: Callable[[Sequence[bytes]], bytes],
) -> int:
    with conn.transaction():
        # NO KEY UPDATE: concurrent appends (whose foreign key takes KEY SHARE) are not held up;
        # a second compaction of the same document waits for this one.
        row = conn.execute(
            "SELECT snapshot FROM documents WHERE space = %s AND doc = %s FOR NO KEY UPDATE",
            (space, doc),
        ).fetchone()
        if row is None:
            return 0
        rows = conn.execute(
            "SELECT seq, blob FROM doc_updates WHERE space = %s AND doc = %s ORDER BY seq",
            (space, doc),
        ).fetchall()
        if not rows:
            return 0
        snapshot = fold(([bytes(row[0])] if row[0] else []) + [bytes(b) for _, b in rows])
        conn.execute(
            "UPDATE documents SET snapshot = %s, snapshot_bytes = %s, version = version + 1"
            " WHERE space = %s AND doc = %s",
            (snapshot, len(snapshot), space, doc),
        )
        conn.execute("DELETE FROM doc_updates WHERE seq = ANY(%s)", ([s for s, _ in rows],))
    return len(rows)


def _sizes(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], int]:
    rows = conn.execute(
        "SELECT d.space, d.doc, d.snapshot_bytes + coalesce(u.bytes, 0)"
        " FROM documents d LEFT JOIN (SELECT space, doc, sum(length(blob)) AS bytes"
        " FROM doc_updates GROUP BY space, doc) u USING (space, doc)"
    ).fetchall()
    return {(s, d): int(n) for s, d, n in rows}
