"""Daemons' hub links against a cluster (issue 14): two real daemons attached to two hub
processes of one cluster (in this process, `serve_hub` in cluster mode on a private Redis and
PostgreSQL) converge, both ways, on environments shared before and after they attached."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import trio
from clusterhub import Cluster, ClusterServers, cluster_missing, cluster_servers  # noqa: F401
from helpers import until as wait_until

if cluster_missing() is not None:  # (before the imports that need coredis and psycopg)
    pytest.skip(str(cluster_missing()), allow_module_level=True)

from test_hub_link import Dev, Hub, hub_state, same_env, team  # noqa: E402

from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.node import announce_accounts_change  # noqa: E402
from peerdaemon.spaces.invite import decode_invite  # noqa: E402


@pytest.fixture
def base():
    path = Path(tempfile.mkdtemp(prefix="pdhub"))  # short: the daemons' sockets live here
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """The test's cluster, on the module's Redis and PostgreSQL (clusterhub.py)."""
    servers: ClusterServers = request.getfixturevalue("cluster_servers")
    return servers.fresh()


async def _eq(value, expected) -> bool:
    return await value == expected


async def test_daemons_on_two_processes_converge(cluster, base, nursery):
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        alice, bob = admin.add_user("alice"), admin.add_user("bob")
    one = await Hub(base, "hub1", cluster).start(nursery)
    two = await Hub(base, "hub2", cluster).start(nursery)
    assert one.key == two.key  # one key for the whole cluster: daemons pin it
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)

    space, [env] = await team(a, one, alice)  # a on process 1
    await hub_state(a, "connected")
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
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


async def test_a_hub_process_restarts_and_revocations_reach_every_process(cluster, base, nursery):
    """The daemon hub tests' core against a cluster (test_hub_link.py: converge, redial after
    the hub restarts, a removed member and a revoked token): a on process 1, b on process 2."""
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        alice, bob = admin.add_user("alice"), admin.add_user("bob")
    one = await Hub(base, "hub1", cluster).start(nursery)
    two = await Hub(base, "hub2", cluster).start(nursery)
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    space, [env] = await team(a, one, alice)
    await hub_state(a, "connected")
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        admin.add_member(space, "bob")
    code = (await a.op("space.invite", space=space, addresses=[]))["code"]
    await b.op("space.join", code=code)
    await b.op("space.hub", space=space, token=bob, url=two.url, hub_key=two.key)
    await hub_state(b, "connected")
    await wait_until(lambda: same_env(a, b, env))

    # process 1 stops; what both edit meanwhile converges once it is back and a redialed
    hub_device = (await a.hub())["device"]
    await one.stop()
    await hub_state(a, "disconnected")
    await a.set_name(env, "offline a")
    env2 = await b.import_env("made on b while process 1 was away")
    await b.op("env.share", id=env2, space=space)
    await one.start(nursery)  # the same port
    assert (await hub_state(a, "connected"))["device"] == hub_device  # the cluster's one key
    await wait_until(lambda: same_env(a, b, env))
    await wait_until(lambda: same_env(a, b, env2))
    assert await b.get(env, "/name") == "offline a"

    # bob removed from the space (by an admin, on PostgreSQL, with a kick): cut on process 2
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        admin.remove_member(space, "bob")
    await trio.to_thread.run_sync(announce_accounts_change, cluster.redis_url)
    await hub_state(b, "disconnected", "forbidden")
    # alice's token revoked: cut on process 1
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        admin.revoke_token(alice)
    await trio.to_thread.run_sync(announce_accounts_change, cluster.redis_url)
    await hub_state(a, "disconnected", "unauthorized")


async def test_a_device_the_cluster_refuses_has_its_daemon_link_cut(cluster, base, nursery):
    """alice may connect one device. a holds it on process 1; b, with another token of
    alice's, is let in by process 2 (no device of alice's there) and then cut by the cluster's
    device slots with the reason an admission refusal gives: too-many-devices."""
    with ClusterAccounts.open_pg(cluster.dsn) as admin:
        alice, alice2 = admin.add_user("alice"), admin.add_token("alice")
        admin.set_limit("devices_per_user", 1, user="alice")
    one = await Hub(base, "hub1", cluster).start(nursery)
    two = await Hub(base, "hub2", cluster).start(nursery)
    a = await Dev(base, "a").start(nursery)
    b = await Dev(base, "b").start(nursery)
    space, [env] = await team(a, one, alice)
    await hub_state(a, "connected")
    code = (await a.op("space.invite", space=space, addresses=[]))["code"]
    await b.op("space.join", code=code)
    await b.op("space.hub", space=space, token=alice2, url=two.url, hub_key=two.key)
    await hub_state(b, "disconnected", "too-many-devices")
    assert two.server is not None and two.server.accounts.devices.refused >= 1
    assert (await a.hub())["state"] == "connected"  # the device holding the slot stays
