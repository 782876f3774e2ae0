"""tests/servers.py: private Redis and PostgreSQL servers on free loopback ports that a test
can kill -9 and restart (the ground the cluster tests stand on)."""

from __future__ import annotations

import socket

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

needs_redis = pytest.mark.skipif(not have_redis(), reason="redis-server is not installed")
needs_pg = pytest.mark.skipif(not have_postgres(), reason="PostgreSQL is not installed")


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1.0).close()
        return True
    except OSError:
        return False


@needs_redis
def test_redis_kill9_keeps_acknowledged_writes_and_restarts_empty_on_request(tmp_path):
    with running_redis(tmp_path / "r") as redis:
        assert isinstance(redis, RedisServer)
        port, pid = redis.port, redis.pid
        assert redis.url == f"redis://127.0.0.1:{port}/0"
        assert redis.command("SET", "k", "v") == b"+OK\r\n"
        redis.kill9()
        assert not redis.running and not _listening(port)
        redis.start()  # same port, same data
        assert redis.port == port and redis.pid != pid
        assert redis.command("GET", "k") == b"$1\r\nv\r\n"
        redis.restart(empty=True)
        assert redis.port == port
        assert redis.command("GET", "k") == b"$-1\r\n"
        redis.stop()
        assert not redis.running and not _listening(port)
    assert not (tmp_path / "r").exists()


@needs_pg
def test_postgres_kill9_restart_keeps_committed_rows():
    psycopg = pytest.importorskip("psycopg")
    with running_postgres() as pg:
        assert isinstance(pg, PostgresServer)
        port, root = pg.port, pg.root
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (1), (2)")
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        pg.kill9()  # the postmaster and every backend at once
        assert not pg.running and not _listening(port)
        pg.start()
        assert pg.port == port
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT sum(n) FROM t").fetchone() == (3,)
        pg.stop()  # a clean (fast) shutdown, then the same data again
        pg.start()
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
        pg.restart(empty=True)
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
    assert not root.exists()


@needs_pg
def test_two_postgres_servers_side_by_side():
    with running_postgres(fsync=False) as a, running_postgres(fsync=False) as b:
        assert a.port != b.port and a.running and b.running
        a.kill9()
        assert b.running and _listening(b.port)
