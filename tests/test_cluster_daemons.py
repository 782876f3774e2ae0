"""Daemons' hub links against a cluster (issue 14): two real daemons attached to two hub
processes of one cluster (in this process, `serve_hub` in cluster mode on a private Redis and
PostgreSQL) converge, both ways, on environments shared before and after they attached."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import trio
from helpers import until as wait_until
from servers import have_postgres, have_redis, running_postgres, running_redis

pytestmark = pytest.mark.skipif(
    not (have_redis() and have_postgres()), reason="needs redis-server and PostgreSQL"
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402
from test_hub_link import FAST, LOCAL, Dev, Hub, hub_state, same_env, team  # noqa: E402

from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.store import migrate  # noqa: E402
from peerdaemon.hub.peers import PeerEndpoint  # noqa: E402
from peerdaemon.hub.server import HubConfig  # noqa: E402
from peerdaemon.spaces.invite import decode_invite  # noqa: E402


class ClusterHub(Hub):
    """`test_hub_link.Hub` as one process of a cluster."""

    def __init__(self, base, name: str, redis_url: str, dsn: str) -> None:
        super().__init__(base)
        self.dir = base / name
        self.redis_url = redis_url
        self.dsn = dsn

    async def start(self, nursery: trio.Nursery) -> ClusterHub:
        config = HubConfig(
            self.dir,
            listen=(LOCAL, self.port or 0),
            accounts_poll=0.05,
            peer_endpoint=lambda docs, accounts, events: PeerEndpoint(
                docs, accounts, events, config=FAST, identity=self.identity
            ),
            redis=self.redis_url,
            postgres=self.dsn,
        )
        self.server = await nursery.start(self._run, config)
        self.port = self.server.port
        return self


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdhub"))  # short: the daemons' sockets live here
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers(tmp_path):
    with (
        running_redis(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        yield redis, pg


async def _eq(value, expected) -> bool:
    return await value == expected


async def test_daemons_on_two_processes_converge(servers, base, nursery):
    redis, pg = servers
    with ClusterAccounts.open_pg(pg.dsn) as admin:
        alice, bob = admin.add_user("alice"), admin.add_user("bob")
    one = await ClusterHub(base, "hub1", redis.url, pg.dsn).start(nursery)
    two = await ClusterHub(base, "hub2", redis.url, pg.dsn).start(nursery)
    assert one.key == two.key  # one key for the whole cluster: daemons pin it
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)

    space, [env] = await team(a, one, alice)  # a on process 1
    await hub_state(a, "connected")
    with ClusterAccounts.open_pg(pg.dsn) as admin:
        admin.add_member(space, "bob")
    code = (await a.op("space.invite", space=space, addresses=[]))["code"]
    assert decode_invite(code).hub == one.url
    await b.op("space.join", code=code)
    await b.op("space.hub", space=space, token=bob, url=two.url, hub_key=two.key)  # b on 2
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))

    await a.set_name(env, "from a")
    await wait_until(lambda: _eq(b.get(env, "/name"), "from a"))
    await b.set_name(env, "from b")
    await wait_until(lambda: _eq(a.get(env, "/name"), "from b"))
    env2 = await b.import_env("made on b")  # shared on process 2 after both attached
    await b.op("env.share", id=env2, space=space)
    await wait_until(lambda: same_env(a, b, env2))
