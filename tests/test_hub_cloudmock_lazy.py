"""The hub's Cloud Mock is loaded on first use (hub/cloudmock.py; issue 13, the hub's idle
memory): not at start when no space hosts a mock; with the first `/mock/` request (which gets
the very answer it always got), with a space document turning a mock on, or at start when one
is hosted already. A load that fails is the Cloud Mock's only, and is tried again.

No mock is served here (the runner is pointed at nothing): tests/test_hub_cloudmock.py serves
them, through the same lazy load.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import trio
from helpers import SPACE, running_hub, setup_accounts, until
from mockutil import request, small_env

from peerdaemon.hub.cloudmock import CloudMock, MockConfig
from peerdaemon.hub.mocks import HostedMocks
from peerdaemon.model import import_environment
from peerdaemon.spaces import SpaceDoc

ME = "TESTDEV"
NOT_FOUND = {"error": "not-found", "message": "no such mock"}


@pytest.fixture
def hubdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PEERDAEMON_MOCK_RUNNER", str(tmp_path / "no-runner"))  # none started
    setup_accounts(tmp_path / "hub", "alice")
    return tmp_path / "hub"


class Space:
    """The space document, written into the hub's store as a member's device would."""

    def __init__(self, server) -> None:
        self.server = server
        self.doc = SpaceDoc()
        self.doc.init("Team", ME, "test")
        self.push()

    def push(self, before: bytes | None = None) -> None:
        update = self.doc.doc.get_update(before) if before else self.doc.doc.get_update()
        self.server.docs.apply(SPACE, "space:" + SPACE, update, "test")

    def host(self, env: dict) -> str:
        env_id = env["uuid"]
        doc, _, _ = import_environment(env, env_id)
        self.server.docs.apply(SPACE, env_id, doc.get_update(), "test")
        before = self.doc.doc.get_state()
        self.doc.set_state(env_id, "shared", ME)
        self.doc.set_mock(env_id, True, "public", secrets.token_urlsafe(24), ME)
        self.push(before)
        return env_id


async def relayed(server, count: int) -> None:
    """Until the hub handed `count` updates to its listeners (the Cloud Mock's among them)."""
    await until(lambda: server.docs.relayed >= count, what=f"{count} updates relayed")


async def get(server, path: str) -> tuple[int, bytes]:
    status, _, body = await trio.to_thread.run_sync(lambda: request(server.port, path))
    return status, body


async def test_the_first_mock_request_loads_it_and_gets_the_same_answer(hubdir, nursery):
    async with running_hub(hubdir) as server:
        assert not server.mocks.loaded
        assert server.mocks.hosted == {} and server.mocks.describe() == []
        assert server.http.mocks.connections == 0
        status, body = await get(server, f"/mock/{SPACE}/{small_env()['uuid']}/hello")
        assert (status, json.loads(body)) == (404, NOT_FOUND)
        assert server.mocks.loaded


async def test_a_space_turning_a_mock_on_loads_it_and_other_changes_do_not(hubdir, nursery):
    async with running_hub(hubdir) as server:
        space = Space(server)
        await relayed(server, 1)
        before = space.doc.doc.get_state()
        space.doc.set_state(small_env()["uuid"], "shared", ME)  # shared, not hosted
        space.push(before)
        await relayed(server, 2)
        assert not server.mocks.loaded
        env_id = space.host(small_env())
        await until(lambda: server.mocks.lookup(SPACE, env_id) is not None, what="hosted")
        assert server.mocks.loaded
        assert [m["env"] for m in server.mocks.describe()] == [env_id]


async def test_a_hub_restarted_with_a_hosted_mock_loads_it_at_start(hubdir, nursery):
    async with running_hub(hubdir) as server:
        env_id = Space(server).host(small_env())
        await until(lambda: server.mocks.lookup(SPACE, env_id) is not None, what="hosted")
    async with running_hub(hubdir) as server:
        assert server.mocks.loaded
        assert server.mocks.lookup(SPACE, env_id) is not None


async def test_a_load_that_fails_is_the_cloud_mocks_only_and_is_tried_again(hubdir, nursery):
    calls: list[int] = []

    def flaky(*args) -> HostedMocks:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no room for mock-files")
        return HostedMocks(*args)

    async with running_hub(hubdir) as server:
        cloud = CloudMock(
            server.docs, server.accounts, server.events, hubdir, MockConfig(), factory=flaky
        )
        async with trio.open_nursery() as inner:
            await inner.start(cloud.run)
            assert await cloud.ready() is None and not cloud.loaded
            [event] = [e for e in server.events.since(0) if e["type"] == "mock-error"]
            assert "no room" in event["data"]["message"]
            assert await cloud.ready() is not None and cloud.loaded
            assert len(calls) == 2
            status, _ = await get(server, "/health")  # the hub went on all along
            assert status == 200
            inner.cancel_scope.cancel()
