"""The test servers leave nothing behind outside their directories: a PostgreSQL killed with
kill -9 (every `close()` kills) left its System V interlock segment and its dynamic shared
memory in /dev/shm, about 30 of each per CI run; a machine allows 4,096 segments, after which
no PostgreSQL starts."""

from __future__ import annotations

import pytest
from servers import PostgresServer, have_postgres, sysv_segment
from servers import sysv_segment_exists as segment_exists

pytestmark = pytest.mark.skipif(not have_postgres(), reason="PostgreSQL is not installed")


def test_a_closed_postgresql_leaves_no_shared_memory() -> None:
    server = PostgresServer(fsync=False)
    try:
        server.start()
        shmid = sysv_segment(server.data / "postmaster.pid")
        assert shmid is not None and segment_exists(shmid)
        server.restart()  # kill -9 and start again: the server's own interlock still works
        assert server.running
        shmid = sysv_segment(server.data / "postmaster.pid")
        assert shmid is not None and segment_exists(shmid)
        assert "dynamic_shared_memory_type=mmap" in server._command()
        assert list((server.data / "pg_dynshmem").iterdir())  # its control segment: a file here
    finally:
        server.close()
    assert not segment_exists(shmid)
    assert not server.root.exists()
