"""The cluster bus (peerdaemon/hub/cluster: protocol.py without I/O, bus.py on a real Redis):
room streams read in order by another process, awareness that expires by itself, kicks,
compaction locks, counters, device slots, and Redis killed or restarted empty under a reader."""

from __future__ import annotations

import pytest
import trio
from servers import have_redis, running_redis

from peerdaemon.hub.cluster.protocol import (
    AWARENESS,
    KICKS_KEY,
    START,
    UPDATE,
    Cursors,
    Kick,
    StreamId,
    awareness_key,
    lock_key,
    room_of,
    safe_trim_id,
    update_key,
)

ROOM = "space1/env1"


# -- protocol (no I/O) ---------------------------------------------------------------------------
def test_room_names_cannot_break_out_of_the_hash_tag():
    assert room_of("space1", "space:space1") == "space1/space:space1"
    assert update_key(ROOM) == "pd:{space1/env1}:u"
    assert awareness_key(ROOM) == "pd:{space1/env1}:a"
    assert lock_key(ROOM) == "pd:{space1/env1}:lock"
    for space, doc in [("a}b", "d"), ("a", "d{x"), ("", "d"), ("a", "")]:
        with pytest.raises(ValueError):
            room_of(space, doc)


def test_stream_ids_order_as_redis_orders_them_and_trimming_keeps_the_recent_window():
    assert StreamId.parse("10-2") < StreamId.parse(b"10-10") < StreamId.parse("11-0")
    assert str(StreamId.parse("1700000000000-3")) == "1700000000000-3"
    with pytest.raises(ValueError):
        StreamId.parse("nope")
    folded = StreamId(5_000, 7)
    assert safe_trim_id(folded, now_ms=100_000, commit_lag_ms=60_000) == folded
    assert safe_trim_id(folded, now_ms=62_000, commit_lag_ms=60_000) == StreamId(2_000, 0)


def test_kicks_round_trip_and_match_only_whom_they_name():
    kick = Kick("forbidden", user="alice", space="s1")
    assert Kick.decode(kick.encode()) == kick
    assert kick.matches("alice", "s1", "h")
    assert not kick.matches("alice", "s2", "h") and not kick.matches("bob", "s1", "h")
    revoked = Kick("unauthorized", token_hash="abc")
    assert revoked.matches("anyone", "any", "abc") and not revoked.matches("a", "s", "abd")
    assert not Kick("forbidden", space="s1").matches("alice", "s1", "h")  # names nobody
    assert Kick.decode({b"kick": b"not json"}) is None
    assert Kick.decode({b"kick": b'{"reason": 3}'}) is None
    assert Kick.decode({b"kick": b'{"reason": "x", "user": 5}'}) is None


def test_cursors_follow_rooms_and_start_over_after_a_loss():
    cursors = Cursors()
    cursors.add(ROOM)
    assert cursors.streams() == {
        update_key(ROOM): START,
        awareness_key(ROOM): START,
        KICKS_KEY: START,
    }
    entries = cursors.advance(
        [
            (update_key(ROOM).encode(), [(b"5-0", {b"k": b"u", b"o": b"p1:3", b"d": b"\x01"})]),
            (awareness_key(ROOM), [("6-0", {b"k": b"a", b"o": b"p2:1", b"d": b"aw"})]),
            (KICKS_KEY, [("7-0", Kick("unauthorized", user="bob").encode()), ("8-0", {})]),
            (update_key(ROOM), [("9-0", {b"junk": b"1"})]),  # not ours: skipped, read past
        ]
    )
    assert [(e.room, e.kind, str(e.id), e.origin, e.data) for e in entries[:2]] == [
        (ROOM, UPDATE, "5-0", "p1:3", b"\x01"),
        (ROOM, AWARENESS, "6-0", "p2:1", b"aw"),
    ]
    assert entries[2].kick == Kick("unauthorized", user="bob") and len(entries) == 3
    assert cursors.streams()[update_key(ROOM)] == "9-0"
    assert cursors.streams()[KICKS_KEY] == "8-0"
    cursors.reset()
    assert set(cursors.streams().values()) == {START}
    cursors.remove(ROOM)
    assert cursors.rooms() == [] and list(cursors.streams()) == [KICKS_KEY]
    # a reply for a room removed while the read was out is dropped
    assert (
        cursors.advance([(update_key(ROOM), [("10-0", {b"k": b"u", b"o": b"x", b"d": b""})])]) == []
    )


# -- on a real Redis -----------------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path):
    if not have_redis():
        pytest.skip("redis-server is not installed")
    pytest.importorskip("coredis")
    with running_redis(tmp_path / "redis") as server:
        yield server


class Reader:
    """A second hub process's view: follows the rooms, collects what it reads."""

    def __init__(self, bus, rooms):
        self.bus = bus
        self.cursors = Cursors()
        for room in rooms:
            self.cursors.add(room)
        self.entries = []
        self.lost = 0
        self.changed = trio.Event()

    def deliver(self, entries):
        self.entries.extend(entries)
        self.changed.set()

    def on_lost(self):
        self.lost += 1
        self.changed.set()

    async def wait_for(self, predicate):
        while not predicate(self.entries):
            self.changed = trio.Event()
            await self.changed.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await self.bus.follow(
            self.cursors, self.deliver, on_lost=self.on_lost, block_ms=500, retry=0.05
        )


def _updates(entries):
    return [e.data for e in entries if e.kind == UPDATE]


async def test_another_process_reads_a_rooms_updates_in_order_and_the_kicks(redis):
    from peerdaemon.hub.cluster.bus import RoomBus, connect

    async with connect(redis.url) as c1, connect(redis.url) as c2:
        one, two = RoomBus(c1, "p1"), RoomBus(c2, "p2")
        reader = Reader(two, [ROOM])
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(reader.run)
                await one.publish_update("space1/other", b"elsewhere", one.origin("1"))
                ids = [
                    await one.publish_update(ROOM, bytes([i]), one.origin("7")) for i in range(50)
                ]
                await one.publish_awareness(ROOM, b"aw", one.origin("7"))
                await one.kick(Kick("unauthorized", token_hash="h1"))
                await reader.wait_for(
                    lambda es: any(e.kick for e in es) and any(e.kind == AWARENESS for e in es)
                )
                nursery.cancel_scope.cancel()  # a blocked XREAD ends with the scope
        assert _updates(reader.entries) == [bytes([i]) for i in range(50)]
        assert [e.id for e in reader.entries if e.kind == UPDATE] == ids == sorted(ids)
        assert {e.origin for e in reader.entries if e.room} == {"p1:7"}
        assert [e.kick for e in reader.entries if e.kick] == [Kick("unauthorized", token_hash="h1")]
        # the client is still in step after the cancelled read
        assert await two.update_count(ROOM) == 50
        assert await one.trim_updates(ROOM, ids[30]) == 30
        assert await two.update_count(ROOM) == 20


async def test_awareness_streams_trim_and_expire_by_themselves(redis):
    from peerdaemon.hub.cluster.bus import RoomBus, connect

    async with connect(redis.url) as client:
        # (a timeout well above the time 250 appends take on a loaded machine)
        bus = RoomBus(client, "p1", awareness_ttl_ms=1500, awareness_key_ttl_ms=2000)
        for i in range(250):
            await bus.publish_awareness(ROOM, b"x%d" % i, "p1:1")
        assert 0 < await bus.awareness_expiry_ms(ROOM) <= 2000
        assert await client.xlen(awareness_key(ROOM)) == 250
        await trio.sleep(1.55)  # Redis' clock: every entry is now past its timeout
        await bus.publish_awareness(ROOM, b"new", "p1:1")
        # MINID ~ drops whole nodes of old entries (100 each): what stays is under one node
        assert await client.xlen(awareness_key(ROOM)) < 101
        await trio.sleep(2.05)  # nobody renewed it: the stream is gone, no compaction needed
        assert await client.exists([awareness_key(ROOM)]) == 0
        assert await bus.update_count(ROOM) == 0  # and the updates were never touched


async def test_compaction_lock_is_one_holders_and_expires(redis):
    from peerdaemon.hub.cluster.bus import CompactionLock, connect

    async with connect(redis.url) as c1, connect(redis.url) as c2:
        a, b = CompactionLock(c1), CompactionLock(c2)
        token = await a.acquire(ROOM, 10_000)
        assert token and await b.acquire(ROOM, 10_000) is None
        assert not await b.release(ROOM, "not-the-token") and not await b.renew(ROOM, "x", 50)
        assert await a.renew(ROOM, token, 150)
        assert await b.acquire(ROOM, 10_000) is None
        await trio.sleep(0.2)  # its holder died: the lock goes by itself
        second = await b.acquire(ROOM, 10_000)
        assert second and not await a.release(ROOM, token)  # the old holder cannot free it
        assert await b.release(ROOM, second) and await a.acquire(ROOM, 1_000)


async def test_counters_and_device_slots_hold_across_processes(redis):
    from peerdaemon.hub.cluster.bus import Counters, DeviceSlots, connect

    async with connect(redis.url) as c1, connect(redis.url) as c2:
        n1, n2 = Counters(c1), Counters(c2)
        hits = [await (n1 if i % 2 else n2).hit("mock:s/e", 300) for i in range(6)]
        assert hits == [1, 2, 3, 4, 5, 6] and await n1.get("mock:s/e") == 6
        await trio.sleep(0.35)
        assert await n2.hit("mock:s/e", 300) == 1  # a new window

        d1, d2 = DeviceSlots(c1), DeviceSlots(c2)
        assert await d1.acquire("alice", "laptop", "p1:1", limit=2, ttl_ms=300)
        assert await d2.acquire("alice", "phone", "p2:4", limit=2, ttl_ms=10_000)
        assert not await d2.acquire("alice", "tablet", "p2:5", limit=2, ttl_ms=10_000)
        assert await d2.acquire("alice", "laptop", "p2:6", limit=2, ttl_ms=10_000)  # same device
        assert await d1.devices("alice") == ["laptop", "phone"]
        await d2.release("alice", "laptop", "p2:6")
        await trio.sleep(0.35)  # p1 was killed: its lease on the laptop lapses
        assert await d2.devices("alice") == ["phone"]
        assert await d2.acquire("alice", "tablet", "p2:5", limit=2, ttl_ms=10_000)
        with pytest.raises(ValueError):
            await d1.acquire("alice", "a\0b", "p1:1", limit=2, ttl_ms=10)


async def test_a_reader_survives_redis_kill9_and_learns_when_it_restarted_empty(redis):
    from peerdaemon.hub.cluster.bus import BusError, RoomBus, connect

    async with connect(redis.url) as c1, connect(redis.url) as c2:
        one, two = RoomBus(c1, "p1"), RoomBus(c2, "p2")
        reader = Reader(two, [ROOM])
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                await nursery.start(reader.run)
                await one.publish_update(ROOM, b"before", "p1:1")
                await reader.wait_for(lambda es: _updates(es) == [b"before"])

                redis.kill9()  # persisted (AOF): the same data and epoch come back
                with pytest.raises(BusError):
                    await one.publish_update(ROOM, b"while-down", "p1:1")
                await trio.to_thread.run_sync(redis.start)
                await one.publish_update(ROOM, b"after-restart", "p1:1")
                await reader.wait_for(lambda es: b"after-restart" in _updates(es))
                assert reader.lost == 0

                await trio.to_thread.run_sync(lambda: redis.restart(empty=True))
                await one.publish_update(ROOM, b"after-empty", "p1:1")
                await reader.wait_for(lambda es: b"after-empty" in _updates(es) and reader.lost)
                assert reader.lost == 1  # told to resync from PostgreSQL
                nursery.cancel_scope.cancel()
        # (what was read from the new stream before the loss showed may come again: harmless)
        seen = list(dict.fromkeys(_updates(reader.entries)))
        assert seen == [b"before", b"after-restart", b"after-empty"]
