"""Hosted-mock limits across a cluster (issue 14, docs/hub-cluster.md "Hosted mocks across the
cluster"): two hub processes of one cluster (`serve_hub` in scaled mode, in this test process,
each with its own node, Redis clients and confined mock runner) on a private Redis and
PostgreSQL. Every process serves every hosted mock; `hosted_mocks` picks the same mocks on
both, and `mock_rps` spent on one process is spent on the other."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
from helpers import SPACE, running_hub
from servers import have_postgres, have_redis, running_postgres, running_redis

pytestmark = pytest.mark.skipif(
    not (have_redis() and have_postgres()), reason="needs redis-server and PostgreSQL"
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402
from mockutil import require_runner, small_env  # noqa: E402
from test_hub_cloudmock import Hosted, echo_env, http, served  # noqa: E402

from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.mocks import owner_ranking  # noqa: E402
from peerdaemon.hub.cluster.store import migrate  # noqa: E402
from peerdaemon.model import import_environment  # noqa: E402

OTHER = "team2"


@pytest.fixture(autouse=True)
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


async def test_hosted_mocks_choose_the_same_mocks_on_every_process(servers, tmp_path):
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


async def test_mock_rps_spent_on_one_process_is_spent_on_the_other(servers, tmp_path):
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
