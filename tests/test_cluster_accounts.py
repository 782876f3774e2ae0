"""The cluster's accounts (hub/cluster/accounts.py): each process keeps a copy of PostgreSQL's
tables, refreshed every second, so a copy can be stale. A space created through a stale copy
must never take over the space another process created meanwhile (a daemon attaching to a
process that had not yet read its team's space would have made itself its owner)."""

from __future__ import annotations

import pytest
from servers import have_postgres, running_postgres

pytestmark = pytest.mark.skipif(not have_postgres(), reason="needs PostgreSQL")
pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from peerdaemon.hub.accounts import AccountsError  # noqa: E402
from peerdaemon.hub.cluster.accounts import ClusterAccounts  # noqa: E402
from peerdaemon.hub.cluster.store import migrate  # noqa: E402

SPACE = "team-space"


@pytest.fixture
def dsn():
    with running_postgres(fsync=False) as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        yield pg.dsn


def test_a_stale_copy_cannot_take_over_a_space_created_elsewhere(dsn):
    with ClusterAccounts.open_pg(dsn) as admin:
        admin.add_user("alice")
        admin.add_user("bob")
    with ClusterAccounts.open_pg(dsn) as one, ClusterAccounts.open_pg(dsn) as two:
        one.create_space(SPACE, "alice", "Team")  # process 1: alice's daemon registers it
        assert two.space(SPACE) is None  # process 2 has not read it yet
        with pytest.raises(AccountsError, match="already exists"):
            two.create_space(SPACE, "bob", "Mine now")  # bob's daemon on process 2
        assert two.space(SPACE) is None  # the copy as it was, until it reads PostgreSQL
        assert two.refresh()
        assert two.space(SPACE)["owner"] == "alice"
        assert two.can_access("alice", SPACE) and not two.can_access("bob", SPACE)
        two.add_member(SPACE, "bob")  # other changes through a stale copy still apply
    with ClusterAccounts.open_pg(dsn) as reread:
        assert reread.space(SPACE)["owner"] == "alice"
        assert reread.space(SPACE)["name"] == "Team"
        assert reread.can_access("bob", SPACE)


async def test_a_token_or_member_added_a_moment_ago_is_let_in_at_once(tmp_path):
    """A connection the copy would refuse has PostgreSQL read again first (`refresh_now`): a
    token or a member added elsewhere (here without a kick, as when Redis lost it; the poll is
    an hour) is let in at once; a wrong token still gets `unauthorized`."""
    from helpers import client, running_hub
    from servers import have_redis, running_redis
    from test_hub_server import expect_denied

    if not have_redis():
        pytest.skip("needs redis-server")
    with running_redis(tmp_path / "redis", persist=False) as redis, running_postgres() as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            migrate(conn)
        with ClusterAccounts.open_pg(pg.dsn) as admin:
            admin.add_user("alice")
            admin.add_user("bob")
            admin.create_space(SPACE, "alice", "Team")
        options = {"redis": redis.url, "postgres": pg.dsn, "accounts_poll": 3600.0}
        async with running_hub(tmp_path / "hub", **options) as hub:
            with ClusterAccounts.open_pg(pg.dsn) as admin:
                alice = admin.add_token("alice")
                bob = admin.add_token("bob")
            async with client(hub, SPACE, "env", alice) as c:
                await c.edit("k", 1)
            await expect_denied(hub, SPACE, "env", bob, "forbidden", 4403)
            with ClusterAccounts.open_pg(pg.dsn) as admin:
                admin.add_member(SPACE, "bob")
            async with client(hub, SPACE, "env", bob) as c:
                assert c.map() == {"k": 1}
            await expect_denied(hub, SPACE, "env", "wrong-token", "unauthorized", 4401)
