"""A daemon's documents on a cluster process that has not loaded them (issue 14, docs/hub-cluster.md,
"Loading for daemon links"): they are read from PostgreSQL off the event loop, and PostgreSQL
away makes the process wait for it, never forget them. On a private Redis and PostgreSQL
(lab/servers.py), with two hub processes (`serve_hub` in cluster mode) and two real daemons in
this process (test_hub_link.py's helpers)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import trio
from clusterhub import Cluster, cluster_missing
from helpers import YClient
from helpers import until as wait_until
from pycrdt import Doc, Map

if cluster_missing() is not None:  # (before the imports that need coredis and psycopg)
    pytest.skip(str(cluster_missing()), allow_module_level=True)

import psycopg  # noqa: E402
from servers import running_postgres, running_redis  # noqa: E402
from test_hub_link import Dev, Hub, hub_holds, hub_state, same_env, team  # noqa: E402
from trio_websocket import open_websocket_url  # noqa: E402

from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.store import migrate  # noqa: E402
from peerdaemon.hub.docs import SPACE_PREFIX  # noqa: E402
from peerdaemon.hub.ywebsocket import MSG_SYNC, SYNC_STEP2, sync_step1  # noqa: E402

ROOM_BOUND = 0.5
"""Seconds within which a y-websocket client of another room must get each edit while the
daemon's documents wait for PostgreSQL (a process blocked on PostgreSQL takes seconds)."""


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdhub"))  # short: the daemons' sockets live here
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers(tmp_path):
    """A Redis and a PostgreSQL of the test's own: it stops PostgreSQL."""
    with (
        running_redis(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        yield redis, pg


async def _committed(hub: Hub, space: str, docs: list[str]) -> bool:
    assert hub.server is not None
    return all(hub.server.docs.pending_ticket(space, d) is None for d in docs)


async def test_postgres_away_while_a_daemon_asks_for_documents_not_loaded_here(
    servers, base, nursery
):
    redis, pg = servers
    cluster = Cluster(redis.url, pg.dsn)
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        alice, bob = admin.add_user("alice"), admin.add_user("bob")
    one = await Hub(base, "hub1", cluster).start(nursery)
    a = await Dev(base, "a").start(nursery)
    space, [env] = await team(a, one, alice)
    await hub_state(a, "connected")
    await a.set_name(env, "before")
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        admin.add_member(space, "bob")
    space_doc = SPACE_PREFIX + space

    await hub_holds(one, space, a, env)
    await wait_until(lambda: _committed(one, space, [space_doc, env]))
    # process 2 starts now: it knows these documents' sizes, not their content
    two = await Hub(base, "hub2", cluster).start(nursery)
    assert two.server is not None
    docs2 = two.server.docs
    assert docs2.has(space, env) and not docs2.is_loaded(space, env)

    # another room of process 2, with a writer and a reader
    url = f"ws://127.0.0.1:{two.port}/yjs/{space}/notes?token={alice}&device="
    async with (
        open_websocket_url(url + "ws") as ws_w,
        open_websocket_url(url + "ws") as ws_r,
        trio.open_nursery() as clients,
    ):
        writer, reader = YClient(ws_w, Doc()), YClient(ws_r, Doc())
        for client in (writer, reader):  # (a room's awareness may come before the sync)
            await client.ws.send_message(sync_step1(client.doc.get_state()))
            while (msg := await client.recv()).kind != MSG_SYNC or msg.sub != SYNC_STEP2:
                pass
        seen: dict[str, trio.Event] = {}

        async def read() -> None:
            while True:
                await reader.recv()
                for key in reader.doc.get("m", type=Map).keys():
                    if key in seen:
                        seen[key].set()

        clients.start_soon(read)
        slowest = 0.0

        async def edit(key: str) -> None:
            nonlocal slowest
            seen[key] = trio.Event()
            start = trio.current_time()
            await writer.edit(key, 1)
            with trio.fail_after(30):
                await seen[key].wait()
            slowest = max(slowest, trio.current_time() - start)

        await edit("first")  # the room exists (created while PostgreSQL answered)
        await wait_until(lambda: _committed(two, space, ["notes"]))
        envs_before = docs2.env_count(space)

        await trio.to_thread.run_sync(pg.stop)
        # b asks process 2 for the space's documents, none of them loaded there
        code = (await a.op("space.invite", space=space, addresses=[]))["code"]
        await b_join(b := await Dev(base, "b").start(nursery), code, space, bob, two)
        await hub_state(b, "connected")
        endpoint = two.server.peer_endpoint

        async def tried() -> bool:  # the link asked for them (or, before, forgot them)
            asked = any(getattr(d.host, "wanted", None) for d in endpoint._daemons.values())
            return asked or not docs2.has(space, env)

        await wait_until(tried)
        for i in range(10):
            await edit(f"away-{i}")
            if i == 5:  # accepted by process 1, not committed: on the bus only
                await a.set_name(env, "while away")
        assert slowest < ROOM_BOUND, f"a room waited {slowest:.3f} s for postgresql"
        # not forgotten: still stored, still counted
        assert docs2.has(space, env) and docs2.has(space, space_doc)
        assert docs2.env_count(space) == envs_before

        await trio.to_thread.run_sync(pg.start)
        await wait_until(lambda: same_env(a, b, env), timeout=60)
        assert await b.get(env, "/name") == "while away"
        await edit("back")
        assert set(reader.doc.get("m", type=Map).keys()) == set(seen)
        clients.cancel_scope.cancel()


async def b_join(b: Dev, code: str, space: str, token: str, hub: Hub) -> None:
    await b.op("space.join", code=code)
    await b.op("space.hub", space=space, token=token, url=hub.url, hub_key=hub.key)
