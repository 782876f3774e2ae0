"""The cluster bus on Redis (coredis, under trio): room streams, the kick stream, compaction
locks, counters and device slots shared by every hub process (docs/hub-cluster.md).

The layout and the cursors are `protocol.py`'s (no I/O); this module only talks to Redis. Every
Redis failure comes out as `BusError`, so the hub's code never sees coredis. What needs two
commands to be safe runs as one Lua script (atomic, one round trip, and the server's clock:
hub processes' clocks may disagree, Redis' is the one the stream ids come from).

On a Redis Cluster (`redis+cluster://`) every command here has its keys in one slot (the hash
tags of `protocol.py`) except two: the reader's XREAD over every followed stream, and the
process list. Redis refuses a command over keys of several slots even when one master serves
them all (CROSSSLOT), so the reader blocks in one XREAD per slot (`RoomBus.follow_slots`),
and the process list asks each master. Each room has its own epoch there (protocol.py), which
an append returns. coredis routes each command to the slot's master and follows MOVED and
ASK during resharding by itself.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import coredis
import trio
from coredis._utils import hash_slot
from coredis.exceptions import RedisError
from coredis.tokens import PureToken

from .protocol import (
    AWARENESS,
    AWARENESS_KEY_TTL_MS,
    AWARENESS_TTL_MS,
    EPOCH_KEY,
    KICKS_KEY,
    KICKS_MAXLEN,
    ROOM_EPOCH_TTL_MS,
    UPDATE,
    BusEntry,
    Cursors,
    Kick,
    StreamId,
    alive_key,
    awareness_key,
    counter_key,
    devices_key,
    encode_entry,
    lock_key,
    room_epoch_key,
    update_key,
)

__all__ = ["BusError", "CompactionLock", "Counters", "DeviceSlots", "RoomBus", "connect"]

log = logging.getLogger("peerdaemon.hub.cluster")


class BusError(Exception):
    """Redis did not answer or refused (down, restarting, loading): the caller retries."""


@asynccontextmanager
async def _errors() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        raise BusError(f"redis: {exc}") from exc
    except OSError as exc:
        raise BusError(f"redis: {exc}") from exc


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """The startup node's `redis://` URL if `url` names a Redis Cluster
    (`redis+cluster://HOST:PORT`, `rediss+cluster://` with TLS), else None."""
    scheme, sep, rest = url.partition("://")
    base = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    return f"{base}://{rest}" if base is not None else None


@asynccontextmanager
async def connect(
    url: str, *, connect_timeout: float = 2.0, blocking_reads: bool = False
) -> AsyncIterator[coredis.Redis | coredis.RedisCluster]:
    """A coredis client for `url` (`redis://HOST:PORT/DB`, or a Redis Cluster's
    `redis+cluster://HOST:PORT`: one node, the client learns the others), bytes in and out. It
    reconnects by itself: a command while Redis is down raises (`BusError` through this
    package's calls), the next one after it is back succeeds. `blocking_reads`: the reader's
    client, which on a cluster holds a connection per followed slot (coredis' default pool,
    64 shared by the nodes, would run out and hold up the reads past it)."""
    base = cluster_url(url)
    client: coredis.Redis | coredis.RedisCluster
    if base is None:
        client = coredis.Redis.from_url(
            url, decode_responses=False, connect_timeout=connect_timeout
        )
    else:
        pool: dict[str, Any] = {}
        if blocking_reads:
            pool = {"max_connections": 16384, "max_connections_per_node": True}
        client = coredis.RedisCluster.from_url(
            base, decode_responses=False, connect_timeout=connect_timeout, **pool
        )
    try:
        async with client:
            yield client
    except RedisError as exc:  # (the cluster's discovery, when the client starts)
        raise BusError(f"redis: {exc}") from exc


# XADD to the awareness stream dropping what is older than the timeout (by Redis' clock), and
# renewing the stream's expiry: one round trip, and no stream outlives its room's quiet.
_AWARENESS_XADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = redis.call('XADD', KEYS[1], 'MINID', '~', tostring(now - tonumber(ARGV[1])), '*',
                      'k', ARGV[2], 'o', ARGV[3], 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return id
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# Device slots of one user: a sorted set of "holder NUL device" scored by the lease's expiry
# (Redis ms). Expired leases go first, so a killed process's devices free themselves.
_DEVICE_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local member = ARGV[1] .. '\\0' .. ARGV[2]
local devices = {}
local count = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local d = string.sub(m, string.find(m, '\\0', 1, true) + 1)
  if not devices[d] then devices[d] = true; count = count + 1 end
end
if not devices[ARGV[2]] and count >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), member)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
_EPOCH = """
local e = redis.call('GET', KEYS[1])
if not e then redis.call('SET', KEYS[1], ARGV[1]); e = ARGV[1] end
return e
"""
# A Redis Cluster's epochs: each key's value, set where missing (the master restarted empty, or
# the room is new), and kept a day past the last look.
_EPOCHS = """
local out = {}
for i, key in ipairs(KEYS) do
  local e = redis.call('GET', key)
  if not e then redis.call('SET', key, ARGV[1]); e = ARGV[1] end
  redis.call('PEXPIRE', key, ARGV[2])
  out[i] = e
end
return out
"""
# An update's XADD on a Redis Cluster, returning the room's epoch with the id: a process knows
# the epoch its update went into, so a master lost right after it is seen, however soon.
_XADD_EPOCH = """
local id = redis.call('XADD', KEYS[1], '*', 'k', ARGV[1], 'o', ARGV[2], 'd', ARGV[3])
local e = redis.call('GET', KEYS[2])
if not e then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5]); e = ARGV[4]
end
return {id, e}
"""
_DEVICES_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')
"""


class RoomBus:
    """Rooms' streams and the kicks: what a process appends, and what it reads (`read`,
    `follow`). `process` names this hub process in the entries' origins."""

    def __init__(
        self,
        client: coredis.Redis,
        process: str,
        *,
        awareness_ttl_ms: int = AWARENESS_TTL_MS,
        awareness_key_ttl_ms: int = AWARENESS_KEY_TTL_MS,
    ) -> None:
        self.client = client
        self.process = process
        self.clustered = isinstance(client, coredis.RedisCluster)
        self.awareness_ttl_ms = awareness_ttl_ms
        self.awareness_key_ttl_ms = awareness_key_ttl_ms
        self._awareness = client.register_script(_AWARENESS_XADD)
        self._time = client.register_script("return redis.call('TIME')")
        self._epoch = client.register_script(_EPOCH)
        self._epochs = client.register_script(_EPOCHS)
        self._xadd_epoch = client.register_script(_XADD_EPOCH)
        self.cursors: Cursors | None = None
        """On a cluster: the reader's cursors, whose rooms' epochs an append records."""

    def origin(self, connection: str) -> str:
        return f"{self.process}:{connection}"

    async def epoch(self) -> str:
        """Redis' epoch: set once by whoever finds none; a Redis that restarted empty has a new
        one, which is how a reader knows the streams lost what it had not read."""
        async with _errors():
            value = await self._epoch(keys=[EPOCH_KEY], args=[secrets.token_hex(8)])
        return _text(value)

    async def room_epochs(self, rooms: list[str]) -> list[str]:
        """On a Redis Cluster: the epochs of rooms whose keys share one slot (KICKS_KEY: the
        kicks'), set where missing. A room's changes when its master restarts empty."""
        keys = [room_epoch_key(room) for room in rooms]
        async with _errors():
            values: Any = await self._epochs(
                keys=keys, args=[secrets.token_hex(8), ROOM_EPOCH_TTL_MS]
            )
        return [_text(v) for v in values]

    async def publish_update(self, room: str, update: bytes, origin: str) -> StreamId:
        if self.clustered:
            return await self._publish_update_epoch(room, update, origin)
        async with _errors():
            sid = await self.client.xadd(update_key(room), encode_entry(UPDATE, origin, update))
        assert sid is not None
        return StreamId.parse(sid)

    async def _publish_update_epoch(self, room: str, update: bytes, origin: str) -> StreamId:
        keys = [update_key(room), room_epoch_key(room)]
        # (a new value each time: one reused would make a master restarted empty look the same
        # to a process whose append had set the epoch before the loss and sets it again after)
        new = secrets.token_hex(8)
        args = [UPDATE, origin.encode(), bytes(update), new, ROOM_EPOCH_TTL_MS]
        async with _errors():
            sid, epoch = await self._xadd_epoch(keys=keys, args=args)  # type: ignore[misc]
        cursors = self.cursors
        if cursors is not None and cursors.follows(room):
            cursors.room_epochs.setdefault(room, _text(epoch))
        return StreamId.parse(sid)

    async def publish_awareness(self, room: str, data: bytes, origin: str) -> StreamId:
        args = [
            self.awareness_ttl_ms,
            AWARENESS,
            origin.encode(),
            bytes(data),
            self.awareness_key_ttl_ms,
        ]
        async with _errors():
            sid = await self._awareness(keys=[awareness_key(room)], args=args)
        return StreamId.parse(sid)  # type: ignore[arg-type]

    async def trim_updates(self, room: str, min_id: StreamId) -> int:
        """Drop the room's update entries below `min_id` (see `protocol.safe_trim_id`)."""
        async with _errors():
            return await self.client.xtrim(update_key(room), PureToken.MINID, str(min_id))  # type: ignore[arg-type]

    async def last_update_id(self, room: str) -> StreamId | None:
        async with _errors():
            newest = await self.client.xrevrange(update_key(room), count=1)
        return StreamId.parse(newest[0].identifier) if newest else None

    async def update_count(self, room: str) -> int:
        async with _errors():
            return await self.client.xlen(update_key(room))

    async def awareness_expiry_ms(self, room: str) -> int:
        async with _errors():
            return await self.client.pttl(awareness_key(room))

    async def server_time_ms(self) -> int:
        async with _errors():
            sec, usec = await self._time()  # (coredis' `time()` loses the microseconds)
        return int(sec) * 1000 + int(usec) // 1000

    async def kick(self, kick: Kick) -> StreamId:
        async with _errors():
            sid = await self.client.xadd(
                KICKS_KEY,
                kick.encode(),
                trim_strategy=PureToken.MAXLEN,
                threshold=KICKS_MAXLEN,
                trim_operator=PureToken.APPROXIMATELY,
            )
        assert sid is not None
        return StreamId.parse(sid)

    async def heartbeat(self, ttl_ms: int, info: bytes = b"1") -> None:
        """This process is alive for `ttl_ms` more (renew it well before); `info` is what
        `processes` shows of it (`hub status`)."""
        async with _errors():
            await self.client.set(alive_key(self.process), info, px=ttl_ms)

    async def processes(self) -> dict[str, bytes]:
        """Every live process (its heartbeat not expired) -> the info it last gave."""
        prefix, _, suffix = alive_key("*").partition("*")
        async with _errors():
            # (on a cluster: SCAN on each master, and MGET split by slot, both by coredis)
            keys = [k async for k in self.client.scan_iter(match=alive_key("*"), count=1000)]
            values = await self.client.mget(keys) if keys else ()
        out: dict[str, bytes] = {}
        for key, value in zip(keys, values, strict=True):
            name = key.decode() if isinstance(key, bytes) else str(key)
            if value is not None and name.startswith(prefix) and name.endswith(suffix):
                out[name[len(prefix) : len(name) - len(suffix)]] = bytes(value)
        return out

    async def alive(self, process: str) -> bool:
        async with _errors():
            return bool(await self.client.exists([alive_key(process)]))

    async def start_cursors(self, cursors: Cursors) -> None:
        """Kicks are read from the newest one on: older ones were for connections gone by now."""
        async with _errors():
            newest = await self.client.xrevrange(KICKS_KEY, count=1)
        cursors.kicks = newest[0].identifier.decode() if newest else "0-0"  # type: ignore[union-attr]

    async def read(
        self, cursors: Cursors, *, block_ms: int = 5000, count: int = 512
    ) -> list[BusEntry]:
        """The next entries of every stream `cursors` follows (waiting up to `block_ms` for
        one); the cursors move past them. Cancellable: trio's cancel scopes end the wait."""
        async with _errors():
            reply = await self.client.xread(cursors.streams(), count=count, block=block_ms)
        if not reply:
            return []
        return cursors.advance(
            (key, [(e.identifier, e.field_values) for e in entries])
            for key, entries in reply.items()
        )

    async def follow(
        self,
        cursors: Cursors,
        deliver: Callable[[list[BusEntry]], Awaitable[None] | None],
        *,
        on_lost: Callable[[], Awaitable[None] | None] | None = None,
        block_ms: int = 5000,
        retry: float = 0.2,
        epoch_every: float = 0.1,
    ) -> None:
        """Read forever, handing each batch to `deliver`. While Redis is away it retries every
        `retry` s; when it is back with a new epoch (it restarted empty) the cursors start
        over and `on_lost()` is called first: the streams lost entries not yet read, which the
        caller must fetch from PostgreSQL and republish (docs/hub-cluster.md, "Redis lost")."""
        # The epoch is checked after reads, not only after an error: the client may reconnect
        # by itself (coredis retries a command on a new connection), and a restart between two
        # reads shows no error at all. What a read returned is delivered first either way
        # (applying an update twice changes nothing), and a busy reader checks at most every
        # `epoch_every` s, so the check costs the relay no latency.
        checked = 0.0
        while True:
            try:
                if cursors.epoch is None:
                    cursors.epoch = await self.epoch()
                    checked = trio.current_time()
                    await self.start_cursors(cursors)
                entries = await self.read(cursors, block_ms=block_ms)
                if entries:
                    await _maybe_await(deliver(entries))
                if entries and trio.current_time() - checked < epoch_every:
                    continue
                now = await self.epoch()
                checked = trio.current_time()
            except BusError as exc:
                log.debug("hub: bus read failed, retrying: %s", exc)
                checked = 0.0
                await trio.sleep(retry)
                continue
            if now != cursors.epoch:
                log.warning("hub: redis restarted empty (new epoch): resyncing rooms")
                cursors.epoch = now
                cursors.reset()
                if on_lost is not None:
                    await _maybe_await(on_lost())

    async def follow_slots(
        self,
        cursors: Cursors,
        deliver: Callable[[list[BusEntry]], Awaitable[None] | None],
        changed: Callable[[], Awaitable[None]],
        *,
        on_lost: Callable[[list[str]], Awaitable[None] | None] | None = None,
        block_ms: int = 5000,
        retry: float = 0.2,
        epoch_every: float = 0.1,
    ) -> None:
        """`follow` on a Redis Cluster: one blocking XREAD per slot holding followed streams
        (the kicks' among them), each its own task, so a room opening or closing restarts only
        its slot's read; `changed()` returns when the followed rooms may have changed. Each
        room has its epoch (protocol.py): the rooms whose epoch changed read their streams
        from the start again and `on_lost(rooms)` resyncs them (their master restarted empty;
        the other masters' rooms lost nothing). Order holds per stream, as with one XREAD."""
        running: dict[int, tuple[frozenset[str], trio.CancelScope]] = {}
        async with trio.open_nursery() as nursery:
            while True:
                groups: dict[int, set[str]] = defaultdict(set)
                for key in cursors.keys():
                    groups[hash_slot(key.encode())].add(key)
                for slot, (keys, scope) in list(running.items()):
                    if groups.get(slot) != keys:
                        scope.cancel()
                        del running[slot]
                for slot, slot_keys in groups.items():
                    if slot not in running:
                        keys, scope = frozenset(slot_keys), trio.CancelScope()
                        running[slot] = (keys, scope)
                        nursery.start_soon(
                            self._follow_slot, cursors, slot, keys, scope, deliver, on_lost,
                            block_ms, retry, epoch_every,
                        )  # fmt: skip
                await changed()

    async def _follow_slot(
        self,
        cursors: Cursors,
        slot: int,
        keys: frozenset[str],
        scope: trio.CancelScope,
        deliver: Callable[[list[BusEntry]], Awaitable[None] | None],
        on_lost: Callable[[list[str]], Awaitable[None] | None] | None,
        block_ms: int,
        retry: float,
        epoch_every: float,
    ) -> None:
        checked = 0.0
        fresh = True  # the epochs are read before the first read
        with scope:
            while True:
                try:
                    streams = cursors.streams_of(keys)
                    if not streams:  # they left: `follow_slots` ends this task
                        await trio.sleep(retry)
                        continue
                    if not fresh:
                        async with _errors():
                            reply = await self.client.xread(streams, count=512, block=block_ms)
                        entries = cursors.advance(
                            (key, [(e.identifier, e.field_values) for e in items])
                            for key, items in (reply or {}).items()
                        )
                        if entries:
                            await _maybe_await(deliver(entries))
                        if entries and trio.current_time() - checked < epoch_every:
                            continue
                    rooms = cursors.rooms_of(keys)
                    epochs = await self.room_epochs(rooms)
                    checked = trio.current_time()
                    if fresh and KICKS_KEY in rooms and KICKS_KEY not in cursors.room_epochs:
                        await self.start_cursors(cursors)  # (from the newest, as `follow`)
                except BusError as exc:
                    log.debug("hub: bus read of slot %d failed, retrying: %s", slot, exc)
                    checked = 0.0
                    await trio.sleep(retry)
                    continue
                lost = []
                for room, epoch in zip(rooms, epochs, strict=True):
                    known = cursors.room_epochs.setdefault(room, epoch)
                    if known != epoch:
                        cursors.room_epochs[room] = epoch
                        lost.append(room)
                fresh = False
                if lost:
                    cursors.reset_rooms(lost)
                    lost = [room for room in lost if room != KICKS_KEY]
                    log.warning(
                        "hub: redis restarted empty (new epoch of %d room(s) in slot %d):"
                        " resyncing them",
                        len(lost),
                        slot,
                    )
                    if on_lost is not None and lost:
                        await _maybe_await(on_lost(lost))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value


class CompactionLock:
    """One compaction worker per room at a time, cluster-wide: SET NX PX with a random token;
    renewed while the work goes on, released only by its holder (a compare-and-delete), and
    gone by itself `ttl_ms` after a holder that died."""

    def __init__(self, client: coredis.Redis) -> None:
        self.client = client
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    async def acquire(self, room: str, ttl_ms: int) -> str | None:
        token = secrets.token_hex(16)
        async with _errors():
            ok = await self.client.set(lock_key(room), token, condition=PureToken.NX, px=ttl_ms)
        return token if ok else None

    async def renew(self, room: str, token: str, ttl_ms: int) -> bool:
        async with _errors():
            return bool(await self._renew(keys=[lock_key(room)], args=[token, ttl_ms]))

    async def release(self, room: str, token: str) -> bool:
        async with _errors():
            return bool(await self._release(keys=[lock_key(room)], args=[token]))


class Counters:
    """Counters shared by the cluster, each living `window_ms` from its first hit: a fixed
    window rate (hosted-mock requests per second) is `hit(name, 1000) <= limit`."""

    def __init__(self, client: coredis.Redis) -> None:
        self.client = client
        self._hit = client.register_script(_HIT)

    async def hit(self, name: str, window_ms: int) -> int:
        async with _errors():
            return int(await self._hit(keys=[counter_key(name)], args=[window_ms]))  # type: ignore[arg-type]

    async def get(self, name: str) -> int:
        async with _errors():
            value = await self.client.get(counter_key(name))
        return int(value) if value is not None else 0


class DeviceSlots:
    """`devices_per_user` across the cluster: a lease per (holder, device), renewed by the
    process holding it (`holder`: process id and connection); several connections of one
    device take one slot; a killed process's leases expire after `ttl_ms`."""

    def __init__(self, client: coredis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(_DEVICE_ACQUIRE)
        self._live = client.register_script(_DEVICES_LIVE)

    async def acquire(self, user: str, device: str, holder: str, limit: int, ttl_ms: int) -> bool:
        if "\0" in holder or "\0" in device:
            raise ValueError("device and holder names cannot hold NUL")
        async with _errors():
            ok = await self._acquire(keys=[devices_key(user)], args=[holder, device, limit, ttl_ms])
        return bool(ok)

    renew = acquire
    """Renewing is acquiring again: the lease's expiry moves on (the device is known)."""

    async def release(self, user: str, device: str, holder: str) -> None:
        async with _errors():
            await self.client.zrem(devices_key(user), [f"{holder}\0{device}"])

    async def devices(self, user: str) -> list[str]:
        async with _errors():
            members: Any = await self._live(keys=[devices_key(user)])
        out = {bytes(m).split(b"\0", 1)[-1].decode() for m in members}
        return sorted(out)
