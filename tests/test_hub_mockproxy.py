"""The Cloud Mock proxy's pool of idle engine connections (hub/mockproxy.py): one idle too long,
or one past the pool's size, is closed and never reused; a fresh one is reused."""

from __future__ import annotations

from types import SimpleNamespace

import h11
import trio
import trio.testing

from peerdaemon.hub.mockproxy import IDLE_REUSE, MAX_IDLE, MockProxy


def proxy() -> MockProxy:
    return MockProxy(SimpleNamespace(config=SimpleNamespace()))  # type: ignore[arg-type]


def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(1):
        return await stream.receive_some() == b""
    return False


async def test_a_stale_idle_connection_is_closed_and_a_fresh_one_reused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    p = proxy()
    (old, old_engine), (new, _) = pair(), pair()
    p._give_back(3000, old, h11.Connection(h11.CLIENT))
    await trio.sleep(IDLE_REUSE + 1)
    p._give_back(3000, new, h11.Connection(h11.CLIENT))
    taken, _client = p._take(3000)
    assert taken is new
    assert p._take(3000) == (None, None)  # the stale one was not handed out...
    assert await closed_by_peer(old_engine)  # ...but closed


async def test_a_connection_past_the_pool_size_is_closed() -> None:
    p = proxy()
    streams = [pair() for _ in range(MAX_IDLE + 1)]
    for ours, _engine in streams:
        p._give_back(3000, ours, h11.Connection(h11.CLIENT))
    assert len(p._idle[3000]) == MAX_IDLE
    assert await closed_by_peer(streams[-1][1])
