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
