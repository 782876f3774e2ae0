"""Which rooms a hub process of a cluster follows (hub/cluster/node.py, `_follow_daemons`): the
documents its daemons sync, and the rooms its y-websocket clients hold. Following is decided
while documents load from PostgreSQL (awaits), so clients come and go in between; a room must
never be dropped while a daemon or a client here still needs its updates.

Fakes stand in for the documents, the rooms and PostgreSQL (no servers): the node's logic
alone, with the loads held open by the test."""

from __future__ import annotations

from typing import Any

import pytest
import trio

pytest.importorskip("coredis")
pytest.importorskip("psycopg")

from peerdaemon.hub.cluster.node import ClusterNode  # noqa: E402
from peerdaemon.hub.cluster.protocol import room_of  # noqa: E402

SPACE = "s" * 16


class FakeDocs:
    def has(self, space_id: str, doc_id: str) -> bool:
        return False

    def is_loaded(self, space_id: str, doc_id: str) -> bool:
        return False


class FakeRooms:
    def __init__(self) -> None:
        self.rooms: dict[tuple[str, str], object] = {}
        self.loading: dict[tuple[str, str], list[object]] = {}


class HeldStore:
    """`read_updates` that waits until the test lets the load finish."""

    def __init__(self) -> None:
        self.started: dict[str, trio.Event] = {}
        self.release: dict[str, trio.Event] = {}

    def hold(self, room: str) -> None:
        self.started[room] = trio.Event()
        self.release[room] = trio.Event()

    async def read_updates(self, room: str) -> list[bytes]:
        if room in self.release:
            self.started[room].set()
            await self.release[room].wait()
        return []


class FakeEndpoint:
    def __init__(self) -> None:
        self.spaces: list[str] = []
        self.envs: dict[str, frozenset[str]] = {}

    def daemons(self) -> list[dict[str, Any]]:
        return [{"spaces": self.spaces}]

    def envs_of(self, space_id: str) -> frozenset[str]:
        return self.envs.get(space_id, frozenset())


def node_with_fakes() -> tuple[ClusterNode, FakeRooms, HeldStore, FakeEndpoint]:
    node = ClusterNode("redis://127.0.0.1:9", "dbname=none", process="p1")
    rooms, store, endpoint = FakeRooms(), HeldStore(), FakeEndpoint()
    node.docs = FakeDocs()  # type: ignore[assignment]
    node.rooms = rooms  # type: ignore[assignment]
    node.store = store  # type: ignore[assignment]
    node.peer_endpoint = endpoint
    return node, rooms, store, endpoint


async def test_a_client_room_opened_while_daemon_rooms_load_stays_followed() -> None:
    node, rooms, store, endpoint = node_with_fakes()
    env, client_env = "e" * 16, "c" * 16
    env_room, client_room = room_of(SPACE, env), room_of(SPACE, client_env)
    store.hold(env_room)
    endpoint.spaces, endpoint.envs = [SPACE], {SPACE: frozenset({env})}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node._follow_daemons, 0.01)
        await store.started[env_room].wait()  # the daemon's environment is loading
        # meanwhile a y-websocket client opens another room of this process
        rooms.rooms[(SPACE, client_env)] = object()
        node.cursors.add(client_room)
        store.release[env_room].set()
        for _ in range(3):  # the round that loaded, and the next ones
            await trio.sleep(0.02)
        assert client_room in node.cursors.rooms()
        assert env_room in node.cursors.rooms()
        nursery.cancel_scope.cancel()


async def test_a_room_a_daemon_now_needs_stays_followed_when_its_last_client_leaves() -> None:
    """The room was open for a client; a daemon attaches and needs it too; the client leaves
    while another of the daemon's documents loads."""
    node, rooms, store, endpoint = node_with_fakes()
    env, other = "e" * 16, "f" * 16
    env_room, other_room = room_of(SPACE, env), room_of(SPACE, other)
    rooms.rooms[(SPACE, env)] = object()
    node.cursors.add(env_room)
    store.hold(other_room)
    endpoint.spaces, endpoint.envs = [SPACE], {SPACE: frozenset({env, other})}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node._follow_daemons, 0.01)
        await store.started[other_room].wait()
        del rooms.rooms[(SPACE, env)]
        node.closed(SPACE, env)  # its last client left (ClusterRooms.leave)
        store.release[other_room].set()
        for _ in range(3):
            await trio.sleep(0.02)
        assert {env_room, other_room} <= set(node.cursors.rooms())
        # the daemons stop needing them: no longer followed
        endpoint.spaces = []
        for _ in range(3):
            await trio.sleep(0.02)
        assert not set(node.cursors.rooms()) & {env_room, other_room}
        nursery.cancel_scope.cancel()


async def test_a_room_that_fails_to_open_is_tried_again_and_the_others_go_on() -> None:
    node, rooms, store, endpoint = node_with_fakes()
    bad, good = "b" * 16, "g" * 16
    bad_room = room_of(SPACE, bad)
    calls: list[str] = []

    async def read_updates(room: str) -> list[bytes]:
        calls.append(room)
        if room == bad_room and calls.count(room) == 1:
            raise RuntimeError("a document this process cannot read (once)")
        return []

    store.read_updates = read_updates  # type: ignore[method-assign]
    endpoint.spaces, endpoint.envs = [SPACE], {SPACE: frozenset({bad, good})}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node._follow_daemons, 0.01)
        with trio.fail_after(5):
            while bad_room not in node.cursors.rooms():
                await trio.sleep(0.01)
        assert room_of(SPACE, good) in node.cursors.rooms()
        assert calls.count(bad_room) == 2
        nursery.cancel_scope.cancel()
