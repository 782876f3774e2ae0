"""What a hub process runs beside its rooms in cluster mode: the publisher that keeps the bus
fed in order through Redis outages, and one room's compaction (docs/hub-cluster.md).

Both stand on `bus.py` and `store.py`; neither knows about rooms' clients, so the hub's room
logic calls them (`Publisher.update` where the single hub enqueues to its store's relay,
`compact_room` where it compacts).
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from .bus import BusError, CompactionLock, RoomBus
from .protocol import AWARENESS, UPDATE, room_of, safe_trim_id
from .store import DocStore

__all__ = ["Publisher", "compact_room"]

log = logging.getLogger("peerdaemon.hub.cluster")


class Publisher:
    """This process's appends to the bus, sent in order by one task. While Redis is away the
    updates wait (in order, none dropped) and go when it is back; waiting awareness is dropped
    instead (a client renews its state every 15 s, an old one would only be trimmed)."""

    def __init__(self, bus: RoomBus, *, retry: float = 0.2) -> None:
        self.bus = bus
        self.retry = retry
        self._queue: deque[tuple[bytes, str, bytes, str]] = deque()
        self._wakeup = trio.Event()
        self.sent = 0
        self.failures = 0

    def update(self, room: str, data: bytes, origin: str) -> None:
        self._queue.append((UPDATE, room, bytes(data), origin))
        self._wakeup.set()

    def awareness(self, room: str, data: bytes, origin: str) -> None:
        self._queue.append((AWARENESS, room, bytes(data), origin))
        self._wakeup.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            kind, room, data, origin = self._queue[0]
            try:
                if kind == UPDATE:
                    await self.bus.publish_update(room, data, origin)
                else:
                    await self.bus.publish_awareness(room, data, origin)
            except BusError as exc:
                self.failures += 1
                log.debug("hub: bus append failed, %d wait: %s", len(self._queue), exc)
                self._queue = deque(e for e in self._queue if e[0] == UPDATE)
                await trio.sleep(self.retry)
                continue
            self._queue.popleft()
            self.sent += 1


async def compact_room(
    bus: RoomBus,
    lock: CompactionLock,
    store: DocStore,
    space: str,
    doc: str,
    *,
    lock_ms: int = 30_000,
    commit_lag_ms: int = 60_000,
) -> int | None:
    """Compact one document if no other process does (-> rows folded, None: the lock is
    someone else's), then trim its update stream to what PostgreSQL now surely holds
    (`protocol.safe_trim_id`). The lock is renewed while the fold runs; a holder that dies
    leaves it to expire."""
    room = room_of(space, doc)
    token = await lock.acquire(room, lock_ms)
    if token is None:
        return None
    try:
        last = await bus.last_update_id(room)  # before the fold: what it may cover at most
        async with trio.open_nursery() as nursery:

            async def renew() -> None:
                while True:
                    await trio.sleep(lock_ms / 3000)
                    try:
                        held = await lock.renew(room, token, lock_ms)
                    except BusError:
                        held = False
                    if not held:  # the fold goes on: the document's row lock keeps it safe
                        log.warning("hub: lost the compaction lock of %s", room)
                        return

            nursery.start_soon(renew)
            folded = await store.compact(space, doc)
            nursery.cancel_scope.cancel()
        if last is not None:
            now = await bus.server_time_ms()
            await bus.trim_updates(room, safe_trim_id(last, now, commit_lag_ms))
        return folded
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await lock.release(room, token)
            except BusError:
                pass  # it expires by itself
