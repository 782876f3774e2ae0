"""The hub gives freed heap back: trimmed once enough of it is free, never otherwise."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from peerdaemon.core.heap import FreeHeap, release_free_heap


class FakeInfo:
    def __init__(self, free: int) -> None:
        self.fordblks = free


class FakeLibc:
    def __init__(self) -> None:
        self.free = 0
        self.trims = 0

    def mallinfo2(self) -> FakeInfo:
        return FakeInfo(self.free)

    def malloc_trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        self.free = 0
        return 1


async def test_trims_only_past_the_threshold(autojump_clock: trio.testing.MockClock) -> None:
    libc = FakeLibc()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: release_free_heap(FreeHeap(libc), period=1.0, above=1000))
        await trio.sleep(5.5)
        assert libc.trims == 0  # nothing free
        libc.free = 900
        await trio.sleep(3)
        assert libc.trims == 0  # not worth it
        libc.free = 5000
        await trio.sleep(1)
        assert libc.trims == 1 and libc.free == 0
        await trio.sleep(3)
        assert libc.trims == 1
        nursery.cancel_scope.cancel()


async def test_without_glibc_it_returns_at_once() -> None:
    heap = FreeHeap.__new__(FreeHeap)
    heap._libc = None
    with trio.fail_after(1):
        await release_free_heap(heap)
    assert heap.free_bytes() == 0


def test_the_real_heap_can_be_read_and_trimmed() -> None:
    heap = FreeHeap()
    if not heap.available:
        pytest.skip("not glibc: nothing to give back")
    blocks = [bytearray(4096) for _ in range(2000)]
    del blocks[::2]
    assert heap.free_bytes() > 0
    heap.trim()
