"""AsyncClient's own I/O: frames written from the caller's task (the writer task only finishes
what the socket did not take), and the socket read by a waiting caller, by another one once it
leaves, and by the background reader while events may come with nobody waiting."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing
from helpers import FakeHandler

from peerdaemon.api.client import ConnectionLost, open_client
from peerdaemon.api.protocol import Pending
from peerdaemon.api.server import serve_unix

BIG = 4 << 20  # more than a Unix socket takes at once


@pytest.fixture
def sock_path(tmp_path_factory):
    return tmp_path_factory.mktemp("c") / "peerdaemon" / "pd.sock"


@pytest.fixture
def handler():
    return FakeHandler()


@pytest.fixture
async def server(nursery, sock_path, handler):
    await nursery.start(partial(serve_unix, sock_path, handler, max_frame=16 << 20))
    return sock_path


async def test_a_cancelled_call_leaves_its_frame_whole(server, handler):
    blob = bytes(range(256)) * (BIG // 256)
    async with open_client(server, max_frame=16 << 20) as c:
        with trio.CancelScope() as scope:
            scope.cancel()
            await c.call("echo", blob=blob)  # written in part, then cancelled
        # the rest is written after it, then this one: the daemon reads both intact
        with trio.fail_after(5):
            assert await c.call("echo", n=1) == {"n": 1}
    assert handler.applied == [("echo", {"blob": blob}), ("echo", {"n": 1})]


async def test_frames_queued_behind_a_big_one_keep_their_order(server, handler):
    blob = b"\x01" * BIG
    results: dict[int, object] = {}
    async with open_client(server, max_frame=16 << 20) as c:

        async def one(n: int) -> None:
            args = {"n": n, "blob": blob} if n % 3 == 0 else {"n": n}
            results[n] = (await c.call("echo", **args))["n"]

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for n in range(9):
                    nursery.start_soon(one, n)
    assert results == {n: n for n in range(9)}
    assert sorted(args["n"] for _, args in handler.applied) == list(range(9))


async def test_the_reading_goes_on_when_the_reader_is_cancelled(server, handler):
    async with open_client(server) as c:
        first = trio.CancelScope()
        got: list[object] = []

        async def a() -> None:
            with first:
                await c.call("durable", gate="a")

        async def b() -> None:
            got.append(await c.call("durable", gate="b", n=2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a)
            await trio.testing.wait_all_tasks_blocked()  # `a` reads the socket
            nursery.start_soon(b)
            await trio.testing.wait_all_tasks_blocked()  # `b` waits for `a` to read for it
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()
            handler.gate("b").set()
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.001)
        assert got == [{"n": 2}]
        handler.gate("a").set()
        assert await c.call("echo", n=3) == {"n": 3}


async def test_a_caller_reads_what_it_waits_for_and_wakes_the_others(server, handler):
    async with open_client(server) as c:
        results: list[object] = []

        async def call(gate: str, n: int) -> None:
            results.append((await c.call("durable", gate=gate, n=n))["n"])

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(call, f"g{n}", n)
                await trio.testing.wait_all_tasks_blocked()
                for n in (3, 0, 4, 1, 2):  # answered out of order: each reaches its caller
                    handler.gate(f"g{n}").set()
                    await trio.sleep(0.01)
        assert results == [3, 0, 4, 1, 2]


async def test_events_are_taken_in_while_nobody_iterates(server, handler):
    """The daemon disconnects a client that leaves its events unread: the background reader
    takes them in (with 6,000 events of 1 kB pushed while nobody waits, more than the daemon
    holds for a client that reads nothing)."""
    event = {"pad": b"x" * 1000}
    async with open_client(server) as c:
        sub = await c.subscribe("subscribe")
        session = handler.sessions[0]
        for _ in range(12):
            for _ in range(500):
                session.push(sub.sub, event)
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(6000):
            assert await sub.__anext__() == event
        assert await c.call("echo", n=1) == {"n": 1}


async def test_an_aclosed_subscription_stops_its_reading_iterator(server, handler):
    never = trio.Event()
    handler.responses["unsubscribe"] = lambda args: Pending(never.wait, True)  # no answer
    async with open_client(server) as c:
        sub = await c.subscribe("subscribe")
        ended = trio.Event()

        async def iterate() -> None:
            async for _ in sub:
                pass
            ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(iterate)
            await trio.testing.wait_all_tasks_blocked()  # the iterator reads the socket
            nursery.start_soon(sub.aclose)  # its unsubscribe is never answered
            with trio.fail_after(5):
                await ended.wait()
            nursery.cancel_scope.cancel()


async def test_a_lost_connection_wakes_the_reading_caller(nursery, sock_path, handler):
    server_scope = trio.CancelScope()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await serve_unix(sock_path, handler, task_status=task_status)

    await nursery.start(run_server)
    async with open_client(sock_path) as c:
        with trio.fail_after(5):
            async with trio.open_nursery() as inner:

                async def reading() -> None:
                    with pytest.raises(ConnectionLost):
                        await c.call("durable", gate="never")

                inner.start_soon(reading)
                await trio.testing.wait_all_tasks_blocked()
                await c.aclose()
