"""The cluster's promise end to end, without the hub: two hub processes (stand-ins holding a
room's document, as the room logic will) on one Redis and one PostgreSQL, clients editing
through both, while Redis restarts empty, PostgreSQL is killed and a compaction runs. Every
edit reaches both processes and PostgreSQL (docs/hub-cluster.md, "Accepted")."""

from __future__ import annotations

import pytest
import trio
from pycrdt import Doc, Text, get_state
from servers import have_postgres, have_redis, running_postgres, running_redis

pytestmark = pytest.mark.skipif(
    not (have_redis() and have_postgres()), reason="needs redis-server and PostgreSQL"
)
pytest.importorskip("coredis")
pytest.importorskip("psycopg")

from peerdaemon.hub.cluster.bus import CompactionLock, RoomBus, connect  # noqa: E402
from peerdaemon.hub.cluster.protocol import UPDATE, Cursors, room_of  # noqa: E402
from peerdaemon.hub.cluster.store import DocStore, DocStoreError  # noqa: E402
from peerdaemon.hub.cluster.worker import Publisher, compact_room  # noqa: E402

SPACE, DOC = "s1", "env1"
ROOM = room_of(SPACE, DOC)


class Process:
    """What a hub process does for one room: applies its clients' edits, stores and publishes
    them, applies what it reads from the bus, and resyncs when Redis lost its streams."""

    def __init__(self, name, client, store):
        self.name = name
        self.bus = RoomBus(client, name)
        self.store = store
        self.publisher = Publisher(self.bus, retry=0.05)
        self.doc = Doc()
        self.cursors = Cursors()
        self.tickets = []
        self.lost = 0

    async def open(self, nursery):
        await nursery.start(self.publisher.run)
        loaded = await self.store.load(SPACE, DOC)
        for update in loaded.updates if loaded else []:
            self.doc.apply_update(update)
        self.cursors.add(ROOM)
        self.resume(nursery)

    def resume(self, nursery):
        self.reading = trio.CancelScope()
        nursery.start_soon(self._follow, self.reading)

    async def _follow(self, scope):
        with scope:
            await self.bus.follow(
                self.cursors, self.deliver, on_lost=self.on_lost, block_ms=300, retry=0.05
            )

    def edit(self, update, client):
        self.doc.apply_update(update)
        origin = self.bus.origin(client)
        self.tickets.append(self.store.append(SPACE, DOC, update, origin))
        self.publisher.update(ROOM, update, origin)

    def deliver(self, entries):
        for entry in entries:
            if entry.kind == UPDATE and not entry.origin.startswith(self.name + ":"):
                self.doc.apply_update(entry.data)

    async def on_lost(self):
        """Redis restarted empty: take what PostgreSQL has, give back what it lacks."""
        self.lost += 1
        try:
            loaded = await self.store.load(SPACE, DOC)
        except DocStoreError:  # PostgreSQL is away too: give back everything
            loaded = None
        base = Doc()
        for update in loaded.updates if loaded else []:
            self.doc.apply_update(update)
            base.apply_update(update)
        missing = self.doc.get_update(get_state(base.get_update()))
        self.publisher.update(ROOM, missing, self.bus.origin("resync"))

    def text(self):
        return str(self.doc.get("t", type=Text))


class Client:
    """A y-websocket client's document: each edit is one update."""

    def __init__(self, letter):
        self.doc = Doc()
        self.text = self.doc.get("t", type=Text)
        self.letter = letter
        self.updates = []
        self.doc.observe(lambda event: self.updates.append(event.update))

    def edit(self):
        self.text += self.letter
        return self.updates[-1]


def union(clients):
    doc = Doc()
    for client in clients:
        for update in client.updates:
            doc.apply_update(update)
    return str(doc.get("t", type=Text))


async def until(predicate, timeout=30):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_two_processes_converge_through_redis_loss_postgres_kill9_and_compaction(tmp_path):
    with (
        running_redis(tmp_path / "redis", persist=False) as redis,
        running_postgres(fsync=False) as pg,
    ):
        store1, store2 = DocStore(pg.dsn, retry=0.05), DocStore(pg.dsn, retry=0.05)
        await store1.open()
        await store2.open()
        async with connect(redis.url) as c1, connect(redis.url) as c2, connect(redis.url) as c3:
            async with trio.open_nursery() as nursery:
                await nursery.start(store1.run)
                await nursery.start(store2.run)
                one, two = Process("p1", c1, store1), Process("p2", c2, store2)
                await one.open(nursery)
                await two.open(nursery)
                clients = [Client(letter) for letter in "abcd"]

                async def edits(n):
                    for i in range(n):
                        client = clients[i % 4]
                        (one if i % 2 else two).edit(client.edit(), f"c{client.letter}")
                        await trio.sleep(0.002)

                await edits(40)
                await until(lambda: one.text() == two.text() == union(clients))

                # Redis restarts empty in the middle of edits: both processes resync
                async with trio.open_nursery() as inner:
                    inner.start_soon(edits, 40)
                    await trio.sleep(0.03)
                    await trio.to_thread.run_sync(lambda: redis.restart(empty=True))
                await until(lambda: one.lost == two.lost == 1)
                await until(lambda: one.text() == two.text() == union(clients))

                # ... again, with entries process 2 never read, some committed (PostgreSQL has
                # them) and some not (PostgreSQL is down: only process 1 has them)
                two.reading.cancel()
                for _ in range(10):
                    one.edit(clients[0].edit(), "ca")
                await until(lambda: one.publisher.queued == 0)
                for ticket in one.tickets:
                    await ticket.wait()
                await trio.to_thread.run_sync(pg.kill9)
                for _ in range(10):
                    one.edit(clients[1].edit(), "cb")
                await until(lambda: one.publisher.queued == 0)
                await trio.to_thread.run_sync(lambda: redis.restart(empty=True))
                await until(lambda: one.lost == 2)
                two.resume(nursery)
                await until(lambda: two.lost == 2)
                await until(lambda: one.text() == two.text() == union(clients))
                await trio.to_thread.run_sync(pg.start)

                # PostgreSQL killed in the middle of edits: the relay goes on, the writers wait
                async with trio.open_nursery() as inner:
                    inner.start_soon(edits, 40)
                    await trio.sleep(0.03)
                    await trio.to_thread.run_sync(pg.kill9)
                await until(lambda: one.text() == two.text() == union(clients))
                await trio.to_thread.run_sync(pg.start)

                # a compaction by one process at a time, then more edits
                locks = CompactionLock(c3)
                held = await locks.acquire(ROOM, 5_000)
                assert await compact_room(one.bus, locks, store1, SPACE, DOC) is None  # busy
                assert await locks.release(ROOM, held)
                for ticket in one.tickets + two.tickets:
                    await ticket.wait()
                folded = await compact_room(one.bus, locks, store1, SPACE, DOC, commit_lag_ms=0)
                assert folded and folded >= 140
                assert await one.bus.update_count(ROOM) <= 1  # trimmed: PostgreSQL has it all
                await edits(20)
                await until(lambda: one.text() == two.text() == union(clients))
                for ticket in one.tickets + two.tickets:
                    await ticket.wait()
                nursery.cancel_scope.cancel()

        # what was accepted is in PostgreSQL: every edit any client made
        loaded = await store1.load(SPACE, DOC)
        doc = Doc()
        for update in loaded.updates:
            doc.apply_update(update)
        assert str(doc.get("t", type=Text)) == union(clients)
        assert len(union(clients)) == 160
        assert loaded.version == 1
        store1.close()
        store2.close()
