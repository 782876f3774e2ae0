"""A cluster for the daemons' hub tests (issue 14): the hub tests run each test that starts a
hub twice, on the embedded hub and on hub processes of a cluster (`serve_hub` with Redis and
PostgreSQL, lab/servers.py).

Starting a Redis and a PostgreSQL costs a second or more, so a test module starts one pair
(`cluster_servers`, module-scoped) and gives each test a cluster of its own on it
(`ClusterServers.fresh`): a new PostgreSQL schema, named in the DSN's search_path, and a Redis
database index emptied first. Nothing of one test's cluster is seen by the next: its hub
processes end with its trio run, and whatever a straggling thread of theirs still writes lands
in their own schema (the product's SQL names no schema; advisory locks are shared by the
database, which only orders tests that run one after the other). A schema costs about half of
a database copied from a template (measured: 14 tests' setup 5.5-9.3 s against 10.1-13.2 s,
and no 200 MB data directory to remove). The tests that kill or restart the servers
(tests/test_cluster_*.py but test_cluster_daemons) start their own.
"""

from __future__ import annotations

import importlib.util
import itertools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from servers import (
    HOST,
    PostgresServer,
    RedisServer,
    have_postgres,
    have_redis,
    running_postgres,
    running_redis,
)

__all__ = ["Cluster", "ClusterAdmin", "ClusterServers", "cluster_missing", "cluster_servers"]

REDIS_DBS = 16  # redis-server's default `databases`


def cluster_missing() -> str | None:
    """Why the cluster variant cannot run here (None: it can)."""
    if not (have_redis() and have_postgres()):
        return "needs redis-server and PostgreSQL"
    for module in ("coredis", "psycopg"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module} (the extra `cluster`)"
    return None


@dataclass(frozen=True)
class Cluster:
    """One test's cluster: where its hub processes keep documents and accounts."""

    redis_url: str
    dsn: str


class ClusterServers:
    """One Redis and one PostgreSQL, a fresh cluster on them per test."""

    def __init__(self, redis: RedisServer, pg: PostgresServer) -> None:
        self.redis = redis
        self.pg = pg
        self._numbers = itertools.count()

    def fresh(self) -> Cluster:
        """A new schema (the DSN's search_path: every connection of the hub processes and the
        admin lands there), migrated, and an emptied Redis database."""
        import psycopg

        from peerdaemon.hub.cluster.store import migrate

        n = next(self._numbers)
        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA hub_{n}")
        dsn = f"{self.pg.dsn} options=-csearch_path=hub_{n}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        index = n % REDIS_DBS
        _flush(self.redis, index)
        return Cluster(self.redis.url.rsplit("/", 1)[0] + f"/{index}", dsn)


def _flush(redis: RedisServer, index: int) -> None:
    """FLUSHDB of database `index` (SELECT then FLUSHDB on one connection)."""

    def resp(*args: str) -> bytes:
        parts = [a.encode() for a in args]
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    with socket.create_connection((HOST, redis.port), timeout=5.0) as s:
        s.sendall(resp("SELECT", str(index)) + resp("FLUSHDB"))
        got = b""
        while got.count(b"\r\n") < 2:
            chunk = s.recv(256)
            if not chunk:
                break
            got += chunk
    assert got == b"+OK\r\n+OK\r\n", got


@pytest.fixture(scope="module")
def cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    """The module's Redis and PostgreSQL (skipped, saying why, where they cannot run)."""
    missing = cluster_missing()
    if missing:
        pytest.skip(missing)
    with (
        running_redis(tmp_path_factory.mktemp("redis"), persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        yield ClusterServers(redis, pg)


class ClusterAdmin:
    """The cluster's accounts as the admin commands change them (`hub user ...` with
    `cluster.postgres`): `ClusterAccounts` read afresh before each call, since the hub
    processes change them too (a daemon registering a space). Like the embedded hub's file,
    the processes pick a change up by their poll."""

    def __init__(self, dsn: str, after: Callable[[], None] | None = None) -> None:
        from peerdaemon.hub.cluster.accounts import ClusterAccounts

        self._accounts = ClusterAccounts.open_pg(dsn)
        self._after = after
        """Called after each call: the test's hub processes read the change now (a real admin
        command kicks them; their poll would pick it up a moment later), so a token just made
        is known to the next connection."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._accounts, name)
        if not callable(attr) or name == "close":
            return attr
        fresh: Callable[..., Any] = attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._accounts.refresh()
            result = fresh(*args, **kwargs)
            if self._after is not None:
                self._after()
            return result

        return call

    def close(self) -> None:
        self._accounts.close()
