"""The cluster's accounts (users, tokens, spaces, members, limits) in PostgreSQL, with every rule
of `hub/accounts.py` unchanged (docs/hub-cluster.md, "Where things live").

`ClusterAccounts` is `Accounts` over an in-memory SQLite copy of the PostgreSQL tables: the
tables are small, and the hub's auth paths stay synchronous (a token check is a lookup in
memory, as today). A change made through it (an admin command, a space a daemon creates) is
written to PostgreSQL at once, in one transaction, as the difference between the copy and what
was last read; a change made elsewhere is seen by `refresh()` (the trigger-kept
`accounts_version` moved), which reloads the copy and calls the change listeners, so live
connections are re-checked with the usual close reasons. Hub processes refresh every second,
and at once on a kick (`node.ClusterNode`): revocation acts cluster-wide within a second.

Writes of two admins at once: each is read-modify-write of whole rows, serialized by an
advisory lock; the later one wins for a row both changed (as with the SQLite file).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import trio

from ..accounts import _SCHEMA, Accounts, AccountsError, Limits
from .store import KEEPALIVES, Bounded, cancel_quietly

__all__ = ["ClusterAccounts"]

log = logging.getLogger("peerdaemon.hub.cluster")

_POLL_NAME = "peerdaemon-hub accounts poll"
_LOCK_ID = 0x70644163  # "pdAc": one accounts writer at a time, cluster-wide

# SQLite table -> (its columns, PostgreSQL's columns, key columns' count: the first ones);
# in insert order (foreign keys), deleted in the reverse order
_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "users": (("name", "personal_space", "created"), ("name", "personal_space", "created"), 1),
    "spaces": (
        ("id", "owner", "name", "personal", "created"),
        ("id", "owner", "name", "personal", "created"),
        1,
    ),
    "tokens": (
        ("hash", "prefix", "user", "created", "revoked"),
        ("hash", "prefix", "user_name", "created", "revoked"),
        1,
    ),
    "members": (("space", "user"), ("space", "user_name"), 2),
    "limits": (("scope", "key", "value"), ("scope", "key", "value"), 2),
}

Rows = dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]


def _to_sqlite(table: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    if table == "spaces":
        return (*row[:3], int(bool(row[3])), row[4])
    return tuple(row)


def _to_pg(table: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    if table == "spaces":
        return (*row[:3], bool(row[3]), row[4])
    return tuple(row)


def _read_pg(conn: psycopg.Connection[Any]) -> tuple[int, Rows]:
    rows: Rows = {}
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        version = conn.execute("SELECT version FROM accounts_version").fetchone()
        for table, (_, pg_cols, nkey) in _TABLES.items():
            cur = conn.execute(f"SELECT {', '.join(pg_cols)} FROM {table}")  # noqa: S608
            rows[table] = {tuple(r[:nkey]): _to_sqlite(table, tuple(r)) for r in cur.fetchall()}
    return (int(version[0]) if version else 0), rows


def _read_sqlite(db: sqlite3.Connection) -> Rows:
    rows: Rows = {}
    for table, (cols, _, nkey) in _TABLES.items():
        cur = db.execute(f"SELECT {', '.join(cols)} FROM {table}")  # noqa: S608
        rows[table] = {tuple(r[:nkey]): tuple(r) for r in cur.fetchall()}
    return rows


def _fill(db: sqlite3.Connection, rows: Rows) -> None:
    with db:
        db.execute("PRAGMA foreign_keys = OFF")
        for table in reversed(_TABLES):
            db.execute(f"DELETE FROM {table}")  # noqa: S608
        for table, (cols, _, _) in _TABLES.items():
            marks = ", ".join("?" for _ in cols)
            db.executemany(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",  # noqa: S608
                list(rows.get(table, {}).values()),
            )
        db.execute("PRAGMA foreign_keys = ON")


class SpaceTaken(Exception):
    """A space this copy created exists in PostgreSQL already (created by another process
    whose change this copy had not read yet)."""


def _push(conn: psycopg.Connection[Any], before: Rows, after: Rows) -> None:
    """Write the difference `before` -> `after` to PostgreSQL in one transaction. A row
    changed on both sides: the later write wins, except a space's creation, which never
    overwrites one that exists (SpaceTaken: the whole change is rolled back), else a stale
    copy would hand another user's space to whoever registered it here."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        for table, (_, pg_cols, nkey) in _TABLES.items():
            keys = pg_cols[:nkey]
            rest = pg_cols[nkey:]
            marks = ", ".join("%s" for _ in pg_cols)
            update = (
                "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in rest)
                if rest
                else "DO NOTHING"
            )
            sql = (
                f"INSERT INTO {table} ({', '.join(pg_cols)}) VALUES ({marks})"  # noqa: S608
                f" ON CONFLICT ({', '.join(keys)}) {update}"
            )
            old, new = before.get(table, {}), after.get(table, {})
            for key, row in new.items():
                if key not in old and table == "spaces":
                    created = conn.execute(
                        f"INSERT INTO spaces ({', '.join(pg_cols)}) VALUES ({marks})"
                        " ON CONFLICT (id) DO NOTHING",
                        _to_pg(table, row),
                    )
                    if created.rowcount != 1:
                        raise SpaceTaken(key[0])
                elif old.get(key) != row:
                    conn.execute(sql, _to_pg(table, row))
        for table in reversed(_TABLES):
            _, pg_cols, nkey = _TABLES[table]
            where = " AND ".join(f"{c} = %s" for c in pg_cols[:nkey])
            old, new = before.get(table, {}), after.get(table, {})
            for key in old.keys() - new.keys():
                conn.execute(f"DELETE FROM {table} WHERE {where}", key)  # noqa: S608


class ClusterAccounts(Accounts):
    """`Accounts` whose tables live in PostgreSQL (see the module's docstring)."""

    FRESH_SPACING = 0.05
    """Seconds at least between two reads `refresh_now` makes."""
    _read_at = -FRESH_SPACING  # (trio time) when the latest read of PostgreSQL began
    PUSH_TIMEOUT = 2.0
    """Seconds a change waits for PostgreSQL: a hub writes from its event loop (a space a
    daemon creates), which a server that hangs must hold up only this long, once."""

    def __init__(self, dsn: str, *, defaults: Limits | None = None) -> None:
        self._pg: psycopg.Connection[Any] = psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=5,
            application_name="peerdaemon-hub accounts",
            **KEEPALIVES,
        )
        self.dsn = dsn
        db = sqlite3.connect(":memory:", isolation_level=None)
        db.execute("PRAGMA foreign_keys = ON")
        db.executescript(_SCHEMA)
        self._pg_version, self._rows = _read_pg(self._pg)
        _fill(db, self._rows)
        self._reloading = False
        self._poll: psycopg.Connection[Any] | None = None  # `refresh_async`'s, in its threads
        self._refreshing = trio.Lock()
        self.pushes = 0  # changes written to PostgreSQL through this copy
        self._pushes = Bounded("pg-accounts")  # (a hub pushes from its event loop)
        super().__init__(db, Path(f"postgresql:{dsn}"), defaults or Limits())

    @classmethod
    def open_pg(cls, dsn: str, *, defaults: Limits | None = None) -> ClusterAccounts:
        try:
            return cls(dsn, defaults=defaults)
        except psycopg.Error as exc:
            raise sqlite3.OperationalError(f"postgresql: {exc}") from exc

    def close(self) -> None:
        super().close()
        self._pg.close()
        if self._poll is not None:
            self._poll.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pg.closed or self._pg.broken:
            self._pg = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, **KEEPALIVES)
        return self._pg

    def _data_version(self) -> int:
        return self._pg_version

    def refresh(self) -> bool:
        """Reload the copy if PostgreSQL's accounts changed (sqlite3.Error if it is away, as
        the file's errors are: the hub's poller logs it and keeps the copy). Blocks on
        PostgreSQL: the hub's poller and kicks use `refresh_async`."""
        return self._take(self._fetch(self._connection(), self._pg_version))

    async def refresh_async(self) -> bool:
        """`refresh` with PostgreSQL read in a worker thread, on a connection of its own: a
        PostgreSQL that hangs holds up this poll, not the process's event loop. A copy
        changed here meanwhile (a space a daemon created) wins: what was read is dropped and
        the next poll reads again (that change moved `accounts_version`)."""
        async with self._refreshing:  # (the poll and a kick: one read at a time, in order)
            return await self._refresh_locked()

    async def refresh_now(self) -> None:
        """Read PostgreSQL once more before a refusal made on what this copy says (a token it
        does not know, a space its user cannot reach): the change may have been made a moment
        ago through another process, whose kick has not come yet or was lost with Redis.
        Connections that arrive together share one read, and reads are `FRESH_SPACING` s
        apart at least, so a client sending bad tokens costs PostgreSQL little."""
        arrived = trio.current_time()
        async with self._refreshing:
            if self._read_at >= arrived:  # a read that began after this call came: enough
                return
            await trio.sleep_until(self._read_at + self.FRESH_SPACING)
            # a caller that gives up (a PostgreSQL that hangs) leaves the read to its thread
            await self._refresh_locked(abandon_on_cancel=True)

    async def _refresh_locked(self, *, abandon_on_cancel: bool = False) -> bool:
        self._read_at = trio.current_time()
        pushes, version = self.pushes, self._pg_version
        fetched = await trio.to_thread.run_sync(
            self._fetch_polled, version, abandon_on_cancel=abandon_on_cancel
        )
        if self.pushes != pushes or self._pg_version != version:
            return False
        return self._take(fetched)

    def _fetch_polled(self, version: int) -> tuple[int, Rows] | None:
        if self._poll is None or self._poll.closed or self._poll.broken:
            try:
                self._poll = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    application_name=_POLL_NAME,
                    **KEEPALIVES,
                )
            except psycopg.Error as exc:
                raise sqlite3.OperationalError(f"postgresql: {exc}") from exc
        return self._fetch(self._poll, version)

    @staticmethod
    def _fetch(conn: psycopg.Connection[Any], version: int) -> tuple[int, Rows] | None:
        """PostgreSQL's accounts if their version is not `version`, else None."""
        try:
            row = conn.execute("SELECT version FROM accounts_version").fetchone()
            if row is None or int(row[0]) == version:
                return None
            return _read_pg(conn)
        except psycopg.Error as exc:
            raise sqlite3.OperationalError(f"postgresql: {exc}") from exc

    def _take(self, fetched: tuple[int, Rows] | None) -> bool:
        if fetched is None:
            return False
        self._pg_version, self._rows = fetched
        _fill(self._db, self._rows)
        self._version = self._pg_version
        self._reloading = True
        try:
            self._changed()
        finally:
            self._reloading = False
        return True

    def _changed(self) -> None:
        if not self._reloading and hasattr(self, "_rows"):
            after = _read_sqlite(self._db)
            if after != self._rows:
                before = self._rows
                try:
                    self._pushes.run(
                        lambda: _push(self._connection(), before, after),
                        self.PUSH_TIMEOUT,
                        lambda: cancel_quietly(self._pg),
                    )
                except TimeoutError as exc:
                    # it may still commit: then the next poll reads it (accounts_version moved)
                    _fill(self._db, self._rows)
                    raise sqlite3.OperationalError(f"postgresql: {exc}") from None
                except SpaceTaken as exc:
                    _fill(self._db, self._rows)  # as it was: the change did not happen
                    raise AccountsError(f"space {exc.args[0]!r} already exists") from None
                except psycopg.Error as exc:
                    _fill(self._db, self._rows)  # as it was: the change did not happen
                    raise sqlite3.OperationalError(f"postgresql: {exc}") from exc
                self._rows = after
                self.pushes += 1
        super()._changed()
