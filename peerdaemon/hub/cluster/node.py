"""One hub process of a cluster (issue 14, docs/hub-cluster.md): the seams by which the single
hub's room logic runs over PostgreSQL and the Redis bus instead of its embedded store.

- `ClusterStore` is what `HubDocs` calls its store (`sizes`, `updates_of`, `enqueue_append`,
  `enqueue_compact`, the settings): appends go to `DocStore` (committed: *accepted*) and to the
  room's stream (`Publisher`), and their tickets complete when PostgreSQL committed them;
  compaction is `worker.compact_room` (one process at a time per room, by the lock).
- `ClusterRooms` is `ywebsocket.Rooms` that tells the node when a room opens on this process
  (load it from PostgreSQL, then read its streams from their start) and closes, and publishes
  the awareness its clients send.
- `ClusterNode.run` reads the streams of the rooms open here: other processes' updates are
  applied to `HubDocs` as `remote` (relayed to this process's clients, stored by their own
  process), their awareness enters the rooms; a Redis that restarted empty is resynced from
  PostgreSQL (`on_lost`).

A room's document is read from PostgreSQL in a worker thread before its first client joins
(`ClusterRooms` holds the room's clients and their messages meanwhile; `ClusterStore.updates_of`
then hands HubDocs' synchronous load what was read), so a large or locked load holds up only
its own room. `figures()` is this process's part of `/metrics`; its heartbeat carries what
`hub status` shows of it (`cluster/status.py`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import cbor2
import trio
from pycrdt import Doc, get_state, merge_updates

from ...core.awareness import decode_awareness
from ...core.identity import SETTING, Identity
from ...model.lib0 import EMPTY_UPDATE
from ...store import StoreError
from ...store.sqlite import CommitTimes, Ticket
from ..accounts import LimitExceeded, Limits
from ..docs import FILES_PREFIX, SPACE_PREFIX, HubDocs, StoreUnavailable
from ..yjs import store_update
from ..ywebsocket import CLOSE_CODES, Framer, Room, Rooms, StoreUpdate, YConn
from .accounts import ClusterAccounts
from .bus import BusError, CompactionLock, RoomBus, connect
from .devices import ClusterDevices
from .mocks import ClusterMocks
from .protocol import ALIVE_TTL_MS, AWARENESS, UPDATE, BusEntry, Cursors, Kick, room_of
from .store import (
    AppendTicket,
    DocStore,
    DocStoreError,
    _Connection,
    _load,
    release_env,
    reserve_env,
)
from .worker import Publisher, compact_room

__all__ = [
    "ClusterDocs",
    "ClusterNode",
    "ClusterRooms",
    "ClusterStore",
    "announce_accounts_change",
]

log = logging.getLogger("peerdaemon.hub.cluster")


MAX_HELD = 1000
"""Messages a connection may send while its room's document loads."""

LOADERS = 4
"""PostgreSQL connections a process loads documents on, at once."""


def _new_identity() -> dict[str, Any]:
    identity = Identity.generate("hub")  # (its public key kept too: core/identity.py)
    return {
        "private_key": identity.private_bytes(),
        "public_key": identity.public_key,
        "name": "hub",
    }


def _no_envs(space: str) -> frozenset[str]:
    return frozenset()


def _split(key: str) -> tuple[str, str]:
    space, _, doc = key.partition("/")
    return space, doc


class ClusterStore:
    """The store `HubDocs` writes to in scaled mode (the subset of `store.Store` it uses)."""

    RETRY_AFTER = 1.0
    """Seconds a load in the trio thread that could not reach PostgreSQL is not tried again."""
    LOAD_TIMEOUT = 2.0
    """Seconds a load in the trio thread waits for PostgreSQL (a server that hangs stalls the
    process this long once, not at every load: `_Connection.run_bounded`)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.docstore = node.docstore
        self._loader = _Connection(node.dsn, name="loader")
        # loads off the event loop (`read_updates`), a few at a time: a document held up by a
        # lock holds up only the rooms waiting for it
        self._loads = [_Connection(node.dsn, name=f"load{i}") for i in range(LOADERS)]
        self._loads_free = trio.CapacityLimiter(LOADERS)
        self._stash: dict[str, list[bytes]] = {}  # read by `read_updates`, for `updates_of`
        self.loads_waiting = 0
        self.sync_loads = 0  # reads in the trio thread (`updates_of` with nothing stashed)
        self._unreachable_at = -self.RETRY_AFTER
        self._sizes: dict[tuple[str, str], int] = {}
        self._settings: dict[str, Any] = {}
        self._tickets: deque[tuple[AppendTicket, Ticket, str, float]] = deque()
        self.readded = 0  # updates appended to their stream again after a long commit
        self.compactions = 0  # documents this process compacted
        self._tickets_wakeup = trio.Event()
        self._compacting: set[str] = set()
        self.commit_times = CommitTimes()
        self.docstore.on_commit = self.commit_times.observe  # (/metrics' histogram)

    async def prefetch(self) -> None:
        self._sizes = await self.docstore.sizes()

        def read(conn: Any) -> dict[str, Any]:
            rows = conn.execute("SELECT key, value FROM settings").fetchall()
            return {str(k): cbor2.loads(bytes(v)) for k, v in rows}

        self._settings = await self.docstore.sql(read)

    # -- what HubDocs reads ----------------------------------------------------------------------
    def sizes(self) -> dict[str, tuple[int, int, int]]:
        return {f"{s}/{d}": (n, 0, 0) for (s, d), n in self._sizes.items()}

    def updates_of(self, key: str) -> list[bytes]:
        """HubDocs' load: what `read_updates` just read for it if anything (the node and the
        daemons' endpoint do that before a room or a daemon uses the document), else, as a last
        resort, a read in the trio thread (`sync_loads`), which holds up the whole process.
        StoreUnavailable if PostgreSQL does not answer, and for `RETRY_AFTER` s after that
        without asking (one that does not answer would stall every room at each load)."""
        stashed = self._stash.pop(key, None)
        if stashed is not None:
            return stashed
        if time.monotonic() - self._unreachable_at < self.RETRY_AFTER:
            raise StoreUnavailable(f"postgresql did not answer just now; {key} not read")
        space, doc = _split(key)
        self.sync_loads += 1
        try:
            loaded = self._loader.run_bounded(
                lambda conn: _load(conn, space, doc), self.LOAD_TIMEOUT
            )
        except Exception as exc:  # (DocStoreError: away, hanging, or refused)
            self._unreachable_at = time.monotonic()
            raise StoreUnavailable(str(exc)) from None
        return loaded.updates if loaded is not None else []

    async def read_updates(self, key: str) -> list[bytes]:
        """The document as committed, read in a worker thread (DocStoreError: PostgreSQL away)."""
        space, doc = _split(key)
        self.loads_waiting += 1
        try:
            async with self._loads_free:
                conn = self._loads.pop()
                try:
                    loaded = await conn.call(lambda c: _load(c, space, doc))
                finally:
                    self._loads.append(conn)
        finally:
            self.loads_waiting -= 1
        return loaded.updates if loaded is not None else []

    # -- what HubDocs writes ---------------------------------------------------------------------
    def enqueue_append(self, key: str, update: bytes) -> Ticket:
        space, doc = _split(key)
        origin = self.node.bus.origin("hub")
        appended = self.docstore.append(space, doc, update, origin)
        self.node.publisher.update(room_of(space, doc), update, origin)
        ticket = Ticket()
        self._tickets.append((appended, ticket, origin, trio.current_time()))
        self._tickets_wakeup.set()
        return ticket

    def enqueue_compact(self, key: str, snapshot: bytes) -> Ticket:
        """Compaction is PostgreSQL's fold of its own rows (`DocStore.compact`), by whichever
        process holds the room's lock: `snapshot` (this process's state) is not needed."""
        ticket = Ticket()
        ticket._complete()
        if key not in self._compacting and self.node.spawn(self._compact, key):
            self._compacting.add(key)
        return ticket

    async def _compact(self, key: str) -> None:
        space, doc = _split(key)
        try:
            folded = await compact_room(
                self.node.bus, self.node.lock, self.docstore, space, doc,
                commit_lag_ms=self.node.commit_lag_ms,
            )  # fmt: skip
            if folded is not None:
                self.compactions += 1
        except (BusError, DocStoreError) as exc:
            log.warning("hub: compaction of %s postponed: %s", key, exc)
        finally:
            self._compacting.discard(key)

    async def follow_tickets(self) -> None:
        """Complete HubDocs' tickets as PostgreSQL commits (in order: the writer commits so).

        An update whose commit took more than half of `commit_lag` is appended to its stream
        again: a compaction may have trimmed it from there before it was committed (it keeps
        only `commit_lag`), and a process that opened the room in between read neither."""
        while True:
            if not self._tickets:
                self._tickets_wakeup = trio.Event()
                await self._tickets_wakeup.wait()
                continue
            appended, ticket, origin, queued = self._tickets[0]
            error: BaseException | None = None
            try:
                await appended.wait()
            except DocStoreError as exc:
                error = StoreError(str(exc))
            self._tickets.popleft()
            ticket._complete(error)
            if error is None and trio.current_time() - queued > self.node.commit_lag_ms / 2000:
                room = room_of(appended.space, appended.doc)
                self.node.publisher.update(room, appended.update, origin)
                self.readded += 1

    @property
    def oldest_uncommitted(self) -> float:
        """Seconds the oldest append not committed yet has waited (0: none waits)."""
        if not self._tickets:
            return 0.0
        return max(0.0, trio.current_time() - self._tickets[0][3])

    # -- settings (the hub's key, removed devices' tokens) ----------------------------------------
    def get_setting(self, key: str, default: Any = None) -> Any:
        return self._settings.get(key, default)

    def put_setting(self, key: str, value: Any) -> Ticket:
        self._settings[key] = cbor2.loads(cbor2.dumps(value))
        ticket = Ticket()
        self.node.spawn(self._put_setting, key, value, ticket)
        return ticket

    async def _put_setting(self, key: str, value: Any, ticket: Ticket) -> None:
        while True:
            try:
                await self.docstore.put_setting(key, value)
            except DocStoreError as exc:
                log.warning("hub: setting %s not stored yet: %s", key, exc)
                await trio.sleep(1.0)
                continue
            ticket._complete()
            return

    async def ensure_setting(self, key: str, make: Callable[[], Any]) -> Any:
        """The setting, created by whichever process comes first (the hub's key: every
        process of a cluster must show the same one)."""

        def create(conn: Any) -> Any:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (key, cbor2.dumps(make())),
                )
            row = conn.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone()
            return cbor2.loads(bytes(row[0]))

        value = await self.docstore.sql(create)
        self._settings[key] = value
        return value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Where `serve_hub` starts the embedded store's writer: the node's tasks."""
        await self.node.run(task_status=task_status)

    def cluster_figures(self) -> dict[str, Any]:
        """The node's figures, for server.py's `/metrics` snapshot."""
        return self.node.figures()

    def close(self) -> None:
        self._loader.close()
        for conn in self._loads:
            conn.close()


class ClusterDocs(HubDocs):
    """`HubDocs` whose `envs_per_space` holds across the cluster: before this process creates
    an environment it takes a place for it in PostgreSQL (`store.reserve_env`: a per-space
    lock, count, insert, in one round trip on the trio thread; creation is rare), so two
    processes creating at the same moment cannot both take the last place, and a document
    still in a writer's queue counts. A place the update did not use (refused for its size,
    not a Yjs update, nothing new) is given back. PostgreSQL away: the count is what this
    process knows, as on the embedded hub (docs/hub-cluster.md says why), and the document
    takes its place when its first update is committed."""

    store: ClusterStore
    RETRY_AFTER = 1.0
    """Seconds a reservation that could not reach PostgreSQL falls back without asking again
    (a server that does not answer would hold up the event loop at every creation)."""
    RESERVE_TIMEOUT = 0.5
    """Seconds a reservation waits for PostgreSQL (p50 about 0.3 ms): past it, a server that
    hangs is taken as away, and is not asked again while that call is stuck."""
    _reserved: tuple[str, str] | None = None  # taken by the `apply` running now
    _unreachable_at = -RETRY_AFTER

    def apply(
        self, space_id: str, doc_id: str, update: bytes, origin: str, *, remote: bool = False
    ) -> Ticket | None:
        self._reserved = None
        try:
            return super().apply(space_id, doc_id, update, origin, remote=remote)
        finally:
            reserved, self._reserved = self._reserved, None
            if reserved is not None and not self.has(*reserved):
                self._release(*reserved)

    def _check_limits(
        self, space_id: str, doc_id: str, entry: Any, update: bytes, origin: str
    ) -> None:
        if entry is None and not doc_id.startswith((SPACE_PREFIX, FILES_PREFIX)):
            self._reserve(space_id, doc_id, origin)
        # then HubDocs' own checks: the size, and the count of what this process knows (never
        # more than what the reservation counted, so it refuses only when PostgreSQL was away)
        super()._check_limits(space_id, doc_id, entry, update, origin)

    def _reserve(self, space_id: str, doc_id: str, origin: str) -> None:
        assert self.limits is not None
        limit = self.limits(space_id).envs_per_space
        if time.monotonic() - self._unreachable_at < self.RETRY_AFTER:
            return
        known = self.env_count(space_id)
        try:
            reserved, held = self.store._loader.run_bounded(
                lambda conn: reserve_env(conn, space_id, doc_id, limit, known),
                self.RESERVE_TIMEOUT,
            )
        except Exception as exc:  # PostgreSQL away (or hanging): what this process knows
            self._unreachable_at = time.monotonic()
            log.warning(
                "hub: cannot reserve a place for %s/%s in postgresql (%s); counting what this"
                " process knows",
                space_id,
                doc_id,
                exc,
            )
            return
        if not reserved:
            refused = LimitExceeded(
                "quota-exceeded",
                f"space {space_id} already holds {max(held, known)} environment(s) (limit {limit})",
            )
            self.events.emit(
                "limit-exceeded", space=space_id, doc=doc_id, reason=refused.reason, origin=origin
            )
            raise refused
        self._reserved = (space_id, doc_id)

    def _release(self, space_id: str, doc_id: str) -> None:
        try:
            self.store._loader.run_bounded(
                lambda conn: release_env(conn, space_id, doc_id), self.RESERVE_TIMEOUT
            )
        except Exception as exc:  # the place stays until the space is full and it is old
            log.warning("hub: cannot give back the place of %s/%s: %s", space_id, doc_id, exc)


class ClusterRooms(Rooms):
    """`Rooms` that tell the node which rooms are open on this process, and publish the
    awareness their clients send.

    A room whose document must be read from PostgreSQL first is opened by a task: its clients
    wait (`loading`, their messages held in order) and join once the document is loaded, so
    none is sent a first sync of a document that is not there yet, while the process's other
    rooms go on."""

    def __init__(self, docs: Any, framer: Framer, node: ClusterNode) -> None:
        super().__init__(docs, framer)
        self.node = node
        self.loading: dict[tuple[str, str], list[YConn]] = {}
        self._held: dict[int, list[bytes]] = {}  # a waiting connection's messages, in order

    def join(self, space_id: str, doc_id: str, conn: YConn) -> Room | None:  # type: ignore[override]
        """The room, or None while its document loads (the connection joins once it is)."""
        key = (space_id, doc_id)
        if key not in self.rooms:
            if key not in self.loading and self.node.needs_load(space_id, doc_id):
                if self.node.spawn(self._load_then_join, space_id, doc_id):
                    self.loading[key] = []
                else:
                    self.node.opening(space_id, doc_id)  # (not running: read it here)
            if key in self.loading:
                self.loading[key].append(conn)
                self._held[conn.number] = []
                return None
            self.node.opening(space_id, doc_id)
        return self._join(space_id, doc_id, conn)

    def _join(self, space_id: str, doc_id: str, conn: YConn) -> Room:
        new = (space_id, doc_id) not in self.rooms
        room = super().join(space_id, doc_id, conn)
        if new:
            told = room.on_awareness
            node = self.node

            def tell(payload: bytes) -> None:
                node.publish_awareness(space_id, doc_id, payload)
                if told is not None:
                    told(payload)

            room.on_awareness = tell
        return room

    async def _load_then_join(self, space_id: str, doc_id: str) -> None:
        key = (space_id, doc_id)
        try:
            await self.node.open_room(space_id, doc_id, waiting=lambda: bool(self.loading[key]))
        except BaseException:
            for conn in self.loading.pop(key, []):
                self._held.pop(conn.number, None)
            raise
        joined = False
        for conn in self.loading.pop(key, []):
            held = self._held.pop(conn.number, [])
            if conn.closing is not None:
                continue
            self._join(space_id, doc_id, conn)
            joined = True
            for data in held:
                event = self.receive(conn, data)
                if event is not None:
                    store_update(self.docs, self, event)
        if not joined:
            self.node.closed(space_id, doc_id)
        self.node.wake()

    def receive(self, conn: YConn, data: bytes, now: float | None = None) -> StoreUpdate | None:
        held = self._held.get(conn.number)
        if held is None or conn.room is not None:
            return super().receive(conn, data, now)
        if len(held) >= MAX_HELD:  # a client flooding a room that is not open yet
            conn.close(CLOSE_CODES["too-slow"], "too-slow")
        else:
            held.append(bytes(data))
        return None

    def connections(self) -> list[YConn]:
        """Those in rooms and those waiting for one (a revocation cuts both)."""
        return super().connections() + [c for conns in self.loading.values() for c in conns]

    def leave(self, conn: YConn) -> None:
        room = conn.room
        if room is None:
            if self._held.pop(conn.number, None) is not None:
                for conns in self.loading.values():
                    if conn in conns:
                        conns.remove(conn)
            return
        super().leave(conn)
        if room.key not in self.rooms:
            self.node.closed(*room.key)


class ClusterNode:
    """A hub process's membership of the cluster: its bus, its PostgreSQL store, its reader.

    `open()` connects (and migrates); `attach(docs, rooms)` hooks it to the room logic; `run()`
    is its tasks (the writer, the publisher, the reader of the open rooms' streams)."""

    def __init__(
        self,
        redis_url: str,
        dsn: str,
        *,
        process: str | None = None,
        commit_lag_ms: int = 60_000,
        block_ms: int = 5000,
        restart_batch: float = 0.02,
    ) -> None:
        self.redis_url = redis_url
        self.dsn = dsn
        self.process = process or secrets.token_hex(6)
        self.commit_lag_ms = commit_lag_ms
        self.block_ms = block_ms
        self.docstore = DocStore(dsn)
        self.cursors = Cursors()
        self.nursery: trio.Nursery | None = None
        self.docs: HubDocs | None = None
        self.rooms: Rooms | None = None
        self._stack = AsyncExitStack()
        self._changed = trio.Event()
        self.resyncs = 0
        self.remote_updates = 0
        self.repairs = 0
        self.kicks = 0
        self.read_restarts = 0  # the blocking read started again (a room opened or closed)
        # what /metrics and `hub status` show (`figures`): set by `_watch` and `deliver`
        self.redis_up = False
        self.postgres_up = False
        self.clock_offset_ms = 0.0  # Redis' clock minus this process's
        self.bus_lag = 0.0  # seconds between an entry's append and its reading, the last read
        self._ping = _Connection(dsn, name="ping", connect_timeout=2.0)
        self.address = ""  # where this process listens (server.py sets it), for `hub status`
        self.restart_batch = restart_batch
        self.wake: Callable[[], None] = lambda: None
        """Have the connections given something to send (awareness) write it (`YjsEndpoint`)."""
        self.accounts: ClusterAccounts | None = None
        self.devices: ClusterDevices | None = None
        self.peer_endpoint: object = None
        """The daemons' endpoint (`peers.PeerEndpoint`): the documents its daemons sync are
        followed too."""
        self.mocks: ClusterMocks | None = None
        """The hosted mocks: every process serves every one, so follows their documents."""
        self._daemon_rooms: set[str] = set()
        self._peers: dict[str, set[str]] = {}  # other processes read -> their rooms
        self._missing: set[str] = set()  # peers whose heartbeat was missing at the last check
        self._held_remote: dict[tuple[str, str], list[tuple[bytes, str]]] = {}
        """Other processes' updates of documents being read (`_apply_remote`)."""
        self.store: ClusterStore

    async def open(self) -> ClusterStore:
        """Connect, migrate, read what the process needs to start; OSError (one line, as for
        the embedded store's files) if PostgreSQL or Redis cannot be reached or refuse."""
        try:
            return await self._open()
        except (DocStoreError, BusError) as exc:
            await self._stack.aclose()
            self.docstore.close()
            raise OSError(f"cluster: {exc}") from None

    async def _open(self) -> ClusterStore:
        await self.docstore.open()
        writer = await self._stack.enter_async_context(connect(self.redis_url))
        self._reader_client = await self._stack.enter_async_context(
            connect(self.redis_url, blocking_reads=True)
        )
        self.bus = RoomBus(writer, self.process)
        self.read_bus = RoomBus(self._reader_client, self.process)
        self.bus.cursors = self.cursors  # (a cluster's appends record their rooms' epochs)
        self.lock = CompactionLock(writer)
        self.publisher = Publisher(self.bus)
        await self.bus.epoch()  # Redis answers (or BusError now rather than at the first edit)
        self.store = ClusterStore(self)
        await self.store.prefetch()
        await self.store.ensure_setting(SETTING, _new_identity)
        return self.store

    async def aclose(self, drain: float = 5.0) -> None:
        """Commit what is still queued (as the embedded store does at a clean stop; what a
        crash leaves uncommitted the other processes store: `repair`), then disconnect."""
        if self.docstore.queued:
            with trio.CancelScope(shield=True), trio.move_on_after(drain):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.docstore.run)
                    while self.docstore.queued:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
        await self._stack.aclose()  # (not shielded: the clients' scopes were opened outside)
        self.store.close()
        self._ping.close()
        self.docstore.close()

    docs_class = ClusterDocs

    def rooms_for(self, docs: HubDocs, framer: Framer) -> ClusterRooms:
        """The rooms of this process, hooked to the node (server.py's seam)."""
        rooms = ClusterRooms(docs, framer, self)
        self.docs = docs
        self.rooms = rooms
        return rooms

    # -- rooms opening and closing on this process ------------------------------------------------
    def needs_load(self, space_id: str, doc_id: str) -> bool:
        """Whether opening the room here reads PostgreSQL (a room followed already, with its
        document in memory or new, does not)."""
        try:
            room = room_of(space_id, doc_id)
        except ValueError:
            return False
        docs = self.docs
        if docs is None:
            return False
        if room not in self.cursors.rooms():
            return True
        return docs.has(space_id, doc_id) and not docs.is_loaded(space_id, doc_id)

    def opening(self, space_id: str, doc_id: str) -> None:
        """A room's first client here, read in the trio thread (`open_room` is the task that
        does not hold up the other rooms; this is for before the node runs)."""
        try:
            room = room_of(space_id, doc_id)
        except ValueError:
            return
        docs = self.docs
        assert docs is not None
        if room in self.cursors.rooms():
            return
        updates: list[bytes] | None = None
        if not docs.has(space_id, doc_id) or docs.is_loaded(space_id, doc_id):
            try:
                updates = self.store.updates_of(room)
            except Exception as exc:  # PostgreSQL away: the stream and the clients' syncs
                log.warning("hub: cannot load %s from postgresql: %s", room, exc)
                updates = []
        self._opened(space_id, doc_id, updates)

    async def open_room(
        self, space_id: str, doc_id: str, *, waiting: Callable[[], bool] | None = None
    ) -> None:
        """Bring the document up to what PostgreSQL holds (it may be new to this process, or
        loaded from earlier but not followed since), read in a worker thread, then read its
        streams from their start, which hold whatever may not be committed yet. While
        PostgreSQL is away the read is tried again as long as `waiting()` (clients wait for
        the room); without it the room opens on the stream alone."""
        room = room_of(space_id, doc_id)
        updates: list[bytes] | None = None
        docs = self.docs
        assert docs is not None
        stored_away = docs.has(space_id, doc_id) and not docs.is_loaded(space_id, doc_id)
        while waiting is not None or not stored_away:  # (not for a daemon's: loaded when used)
            try:
                updates = await self.store.read_updates(room)
                break
            except DocStoreError as exc:
                if waiting is None or not waiting():
                    log.warning("hub: cannot load %s from postgresql: %s", room, exc)
                    updates = None
                    break
                log.warning("hub: %s waits for postgresql: %s", room, exc)
                await trio.sleep(1.0)
        self._opened(space_id, doc_id, updates)

    def _opened(self, space_id: str, doc_id: str, updates: list[bytes] | None) -> None:
        """The room's document is `updates` in PostgreSQL (None: not read): load it or bring it
        up to them, then follow the room's streams."""
        docs = self.docs
        assert docs is not None
        room = room_of(space_id, doc_id)
        if updates is not None:
            if docs.has(space_id, doc_id) and not docs.is_loaded(space_id, doc_id):
                self.store._stash[room] = updates  # what HubDocs' load takes
                try:
                    docs.get_doc(space_id, doc_id)
                finally:
                    self.store._stash.pop(room, None)
            elif updates:
                self._apply_remote(space_id, doc_id, merge_updates(*updates), "postgres")
        if room not in self.cursors.rooms():
            self.cursors.add(room)
            self._changed.set()

    def closed(self, space_id: str, doc_id: str) -> None:
        room = room_of(space_id, doc_id)
        if room not in self._daemon_rooms:
            self.cursors.remove(room)
            self._changed.set()

    def mocks_for(self, *args: Any, **kwargs: Any) -> ClusterMocks:
        """This process's hosted mocks (server.py's seam): every mock of the cluster."""
        self.mocks = ClusterMocks(self, *args, **kwargs)
        return self.mocks

    # -- the daemons' documents ------------------------------------------------------------------
    def daemon_rooms(self) -> set[str]:
        """Every document of the spaces this process's daemons sync (their space documents,
        shared environments and their files): followed as an open room is."""
        endpoint = self.peer_endpoint
        daemons = getattr(endpoint, "daemons", None)
        envs_of = getattr(endpoint, "envs_of", None)
        if daemons is None or envs_of is None:
            return set()
        out: set[str] = set()
        needs_read = getattr(self.docs, "needs_read", None)
        for space in {s for d in daemons() for s in d.get("spaces", ())}:
            docs = [SPACE_PREFIX + space]
            if needs_read is not None and needs_read(space, docs[0]):
                envs_of = _no_envs  # read ahead by the link first: its envs at the next round
            else:
                envs_of = getattr(endpoint, "envs_of", _no_envs)
            for env in envs_of(space):
                docs += [env, FILES_PREFIX + env]
            for doc in docs:
                try:
                    out.add(room_of(space, doc))
                except ValueError:
                    continue
        return out

    async def _follow_daemons(self, every: float = 0.5) -> None:
        """Keep the followed rooms in step with what the daemons here sync (a daemon attaching,
        an environment shared on another process: its space document says so)."""
        while True:
            if self.mocks is not None and self.mocks.config.enabled:
                await self._read_space_docs_ahead()  # what `mocks.rooms()` reads next
            try:
                wanted = self.daemon_rooms()
                if self.mocks is not None:
                    wanted |= self.mocks.rooms()
            except StoreUnavailable as exc:  # read again at the next round
                log.debug("hub: listing the daemons' documents waits for postgresql: %s", exc)
                wanted = self._daemon_rooms
            except Exception:
                log.exception("hub: listing the daemons' documents failed")
                wanted = self._daemon_rooms
            # Wanted before the opening awaits: a client leaving one of these rooms meanwhile
            # must not stop this process following it (`closed`).
            new, self._daemon_rooms = wanted - self._daemon_rooms, wanted
            for room in sorted(new):
                try:
                    await self.open_room(*_split(room))
                except Exception:  # that room's state, not the node's end: tried again
                    log.exception("hub: following %s failed", room)
                    self._daemon_rooms = self._daemon_rooms - {room}
            # Read after the awaits: a room a client opened (or is opening) meanwhile stays.
            open_here: set[str] = set()
            if self.rooms is not None:
                open_here = {room_of(*key) for key in self.rooms.rooms}
                open_here |= {room_of(*key) for key in getattr(self.rooms, "loading", ())}
            for room in set(self.cursors.rooms()) - self._daemon_rooms - open_here:
                self.cursors.remove(room)
                self._changed.set()
            await trio.sleep(every)

    async def _read_space_docs_ahead(self) -> None:
        """The space documents not in memory, read in worker threads (the hosted mocks read
        every one, in the event loop otherwise)."""
        docs = self.docs
        if docs is None:
            return
        for space in docs.spaces():
            if docs.needs_read(space, SPACE_PREFIX + space):
                try:
                    await docs.load_ahead(space, SPACE_PREFIX + space)
                except StoreUnavailable:
                    return  # PostgreSQL away: the next round

    def publish_awareness(self, space_id: str, doc_id: str, payload: bytes) -> None:
        self.publisher.awareness(room_of(space_id, doc_id), payload, self.bus.origin("yws"))

    def _apply_remote(self, space_id: str, doc_id: str, update: bytes, origin: str) -> None:
        """Another process's update. For a document stored but not in memory here, it is held
        while the document is read in a worker thread (`_load_remote`), then applied: the
        event loop never waits for PostgreSQL, and PostgreSQL away loses nothing for this
        process's listeners (tried again until it answers)."""
        docs = self.docs
        assert docs is not None
        key = (space_id, doc_id)
        held = self._held_remote.get(key)
        if held is None and docs.needs_read(space_id, doc_id):
            if self.spawn(self._load_remote, space_id, doc_id):
                held = self._held_remote[key] = []
        if held is not None:
            held.append((update, origin))
            if len(held) > MAX_HELD:  # bounded: one merged update holds them all
                held[:] = [(merge_updates(*(u for u, _ in held)), origin)]
            return
        self._apply_now(space_id, doc_id, update, origin)

    def _apply_now(self, space_id: str, doc_id: str, update: bytes, origin: str) -> None:
        assert self.docs is not None
        try:
            self.docs.apply(space_id, doc_id, update, origin, remote=True)
        except ValueError as exc:
            log.warning("hub: %s/%s: bad update from the bus: %s", space_id, doc_id, exc)
        except StoreUnavailable as exc:  # (not running: no task to hold it for)
            log.warning("hub: %s/%s: update from the bus not applied: %s", space_id, doc_id, exc)

    async def _load_remote(self, space_id: str, doc_id: str) -> None:
        assert self.docs is not None
        key = (space_id, doc_id)

        def apply_held() -> None:
            for update, origin in self._held_remote.pop(key, []):
                self._apply_now(space_id, doc_id, update, origin)

        try:
            while True:
                try:
                    await self.docs.load_ahead(space_id, doc_id, then=apply_held)
                    return
                except StoreUnavailable as exc:
                    log.warning("hub: %s/%s waits for postgresql: %s", space_id, doc_id, exc)
                    await trio.sleep(self.store.RETRY_AFTER)
        finally:
            self._held_remote.pop(key, None)  # (cancelled: the process stops)

    # -- the reader ------------------------------------------------------------------------------
    def deliver(self, entries: list[BusEntry]) -> None:
        if entries:  # (an entry's id is Redis' clock when it was appended)
            now_ms = time.time() * 1000 + self.clock_offset_ms
            self.bus_lag = max(0.0, (now_ms - entries[-1].id.ms) / 1000)
        mine = self.process + ":"
        rooms = self.rooms
        woken = False
        for entry in entries:
            if entry.kick is not None:
                self._kicked()
                continue
            if entry.room is None or entry.origin.startswith(mine):
                continue
            space_id, doc_id = _split(entry.room)
            if entry.kind == UPDATE:
                self.remote_updates += 1
                peer = entry.origin.partition(":")[0]
                self._peers.setdefault(peer, set()).add(entry.room)
                self._apply_remote(space_id, doc_id, entry.data, entry.origin)
            elif entry.kind == AWARENESS and rooms is not None:
                room = rooms.rooms.get((space_id, doc_id))
                if room is None:
                    continue
                room.inject(entry.data)
                self._renew_remote_states(room, entry.data)
                woken = True
        if woken:
            self.wake()

    def _kicked(self) -> None:
        """An admin changed the accounts (a revoked token, a removed member): re-read them now
        rather than at the next poll; the accounts' listeners cut whom they must."""
        self.kicks += 1
        if self.accounts is None:
            return
        log.info("hub: accounts changed (kick): re-reading them")
        self.spawn(self._refresh_accounts)  # (False only while stopping)

    async def _refresh_accounts(self) -> None:
        """PostgreSQL is read in a worker thread: one that hangs holds up this, not the loop."""
        assert self.accounts is not None
        try:
            await self.accounts.refresh_async()
        except Exception as exc:  # PostgreSQL away: the poll tries again
            log.warning("hub: cannot re-read the accounts after a kick: %s", exc)

    def open_accounts(self, defaults: Limits) -> ClusterAccounts:
        accounts = self.accounts = ClusterAccounts.open_pg(self.dsn, defaults=defaults)
        self.devices = ClusterDevices(lambda user: accounts.limits_for(user).devices_per_user, self)
        accounts.devices = self.devices
        return accounts

    @staticmethod
    def _renew_remote_states(room: Room, payload: bytes) -> None:
        """States from another process expire as this process's clients' do (30 s without
        renewal): a process that dies leaves no ghosts."""
        now = time.monotonic()
        try:
            for e in decode_awareness(payload):
                if not e.removed and e.client in room.states:
                    room.renewed[e.client] = now
        except Exception:
            pass

    async def on_lost(self, rooms: list[str] | None = None) -> None:
        """Redis restarted empty: take what PostgreSQL has, and give the new streams what
        PostgreSQL lacks of each open room (uncommitted updates, ours and others'). On a
        Redis Cluster only `rooms` (those whose slots' master restarted empty)."""
        self.resyncs += 1
        docs = self.docs
        assert docs is not None
        for room in self.cursors.rooms() if rooms is None else rooms:
            space_id, doc_id = _split(room)
            try:
                loaded = await self.docstore.load(space_id, doc_id)
            except DocStoreError:
                loaded = None  # PostgreSQL away too: give back everything
            base = Doc()
            for update in loaded.updates if loaded else []:
                base.apply_update(update)
            if loaded and loaded.updates:
                self._apply_remote(space_id, doc_id, merge_updates(*loaded.updates), "postgres")
            if not docs.is_loaded(space_id, doc_id):
                continue  # nothing of it in memory here to give back
            doc = docs.get_doc(space_id, doc_id)
            if doc is None:
                continue
            missing = doc.get_update(get_state(base.get_update()))
            self.publisher.update(room, missing, self.bus.origin("resync"))

    # -- a process that died -----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Say this process is alive, and notice the peers whose updates it applied that are
        not any more (their heartbeat missing twice in a row: a Redis that restarted empty
        has none for a moment)."""
        every = ALIVE_TTL_MS / 3000
        while True:
            try:
                await self.bus.heartbeat(ALIVE_TTL_MS, self._heartbeat_info())
                for peer in list(self._peers):
                    if await self.bus.alive(peer):
                        self._missing.discard(peer)
                    elif peer in self._missing:
                        self._missing.discard(peer)
                        rooms = self._peers.pop(peer)
                        self.spawn(self.repair, peer, rooms)
                    else:
                        self._missing.add(peer)
            except BusError as exc:
                log.debug("hub: heartbeat failed: %s", exc)
            await trio.sleep(every)

    async def repair(self, peer: str, rooms: set[str]) -> None:
        """`peer` died: what it relayed here but had not committed was never accepted, and its
        clients, reconnecting to a process that holds it already, would not send it again.
        Store what this process holds of its rooms that PostgreSQL lacks (a row twice is
        harmless: Yjs updates apply once, and the next compaction folds the copy away)."""
        log.warning("hub: process %s is gone; storing what it had not", peer)
        self.repairs += 1
        for room in sorted(rooms):
            space_id, doc_id = _split(room)
            docs = self.docs
            if docs is None or not (
                docs.is_loaded(space_id, doc_id) or (space_id, doc_id) in self._held_remote
            ):
                continue  # not in memory here: nothing PostgreSQL could lack from this process
            while (doc := self._loaded_doc(space_id, doc_id)) is False:
                await trio.sleep(1.0)  # its held updates wait for postgresql
            if doc is None:
                continue
            while True:
                try:
                    loaded = await self.docstore.load(space_id, doc_id)
                    break
                except DocStoreError as exc:
                    log.warning("hub: repair of %s waits for postgresql: %s", room, exc)
                    await trio.sleep(1.0)
            base = Doc()
            for update in loaded.updates if loaded else []:
                base.apply_update(update)
            missing = doc.get_update(base.get_state())
            if missing != EMPTY_UPDATE:
                self.docstore.append(space_id, doc_id, missing, self.bus.origin("repair"))

    def _loaded_doc(self, space_id: str, doc_id: str) -> Doc | None | bool:
        """The document if in memory (with what was held for it), None, or False if the store
        cannot be read now."""
        assert self.docs is not None
        if (space_id, doc_id) in self._held_remote:
            return False
        try:
            return self.docs.get_doc(space_id, doc_id)
        except StoreUnavailable:
            return False

    async def _read(self) -> None:
        """Follow the open rooms' streams; a room opened or closed restarts the blocking read,
        once per `restart_batch` s at most: the read goes on meanwhile, and a burst of joins
        costs a few restarts (each cancels a read, and coredis reconnects), not one each.
        On a Redis Cluster a read per slot, of which a change restarts only its slot's."""
        if self.read_bus.clustered:
            await self.read_bus.follow_slots(
                self.cursors, self.deliver, self._slots_changed,
                on_lost=self._on_lost, block_ms=self.block_ms,
            )  # fmt: skip
            return
        while True:
            self._changed = trio.Event()
            self.read_restarts += 1
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    await self.read_bus.follow(
                        self.cursors, self.deliver, on_lost=self._on_lost, block_ms=self.block_ms
                    )

                nursery.start_soon(follow)
                await self._changed.wait()
                await trio.sleep(self.restart_batch)
                nursery.cancel_scope.cancel()

    async def _slots_changed(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()
        self.read_restarts += 1
        await trio.sleep(self.restart_batch)

    async def _on_lost(self, rooms: list[str] | None = None) -> None:
        with trio.CancelScope(shield=True):
            await self.on_lost(rooms)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.docstore.run)
            await nursery.start(self.publisher.run)
            nursery.start_soon(self.store.follow_tickets)
            nursery.start_soon(self._read)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._watch)
            nursery.start_soon(self._follow_daemons)
            if self.devices is not None:
                nursery.start_soon(self.devices.renew)
            task_status.started()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start `fn(*args)` in the node's nursery; False once it stopped (shutting down)."""
        if self.nursery is None:
            return False
        try:
            self.nursery.start_soon(fn, *args)
        except RuntimeError:  # closed to new arrivals
            return False
        return True

    async def _watch(self, every: float = 1.0, timeout: float = 5.0) -> None:
        """Whether Redis and PostgreSQL answer (asked on connections of their own, so a busy
        writer or a long compaction does not look like an outage), and Redis' clock against
        this process's, which the bus lag is measured by."""
        while True:
            with trio.move_on_after(timeout) as waited:
                try:
                    before = time.time() * 1000
                    server = await self.bus.server_time_ms()
                    self.clock_offset_ms = server - (before + time.time() * 1000) / 2
                    self.redis_up = True
                except BusError as exc:
                    log.debug("hub: redis does not answer: %s", exc)
                    self.redis_up = False
            if waited.cancelled_caught:
                self.redis_up = False
            with trio.move_on_after(timeout) as waited:
                try:
                    await self._ping.call(lambda conn: conn.execute("SELECT 1"))
                    self.postgres_up = True
                except DocStoreError as exc:
                    log.debug("hub: postgresql does not answer: %s", exc)
                    self.postgres_up = False
            if waited.cancelled_caught:
                self.postgres_up = False
            await trio.sleep(every)

    def _heartbeat_info(self) -> bytes:
        """What `hub status` shows of this process (JSON in its heartbeat)."""
        rooms = self.rooms
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "address": self.address,
            "rooms": len(rooms.rooms) if rooms is not None else 0,
            "clients": rooms.clients if rooms is not None else 0,
            "rooms_followed": len(self.cursors.rooms()),
            "queued_commits": self.docstore.queued,
            "oldest_commit_wait": round(self.store.oldest_uncommitted, 3),
            "bus_lag": round(self.bus_lag, 4),
            "postgres_up": self.postgres_up,
        }
        return json.dumps(info).encode()

    def figures(self) -> dict[str, Any]:
        """This process's part of the cluster for /metrics (`metrics.hub_families`' keys)."""
        rooms = self.rooms
        store = self.store
        return {
            "cluster_process": self.process,
            "cluster_redis_up": int(self.redis_up),
            "cluster_postgres_up": int(self.postgres_up),
            "cluster_rooms_followed": len(self.cursors.rooms()),
            "cluster_rooms_loading": len(getattr(rooms, "loading", ())),
            "cluster_queued_commits": self.docstore.queued,
            "cluster_oldest_commit_wait": store.oldest_uncommitted,
            "cluster_queued_publishes": self.publisher.queued,
            "cluster_bus_lag": self.bus_lag,
            "cluster_remote_updates": self.remote_updates,
            "cluster_resyncs": self.resyncs,
            "cluster_repairs": self.repairs,
            "cluster_kicks": self.kicks,
            "cluster_readded": store.readded,
            "cluster_read_restarts": self.read_restarts,
            "cluster_compactions": store.compactions,
            "cluster_sync_loads": store.sync_loads,
        }

    def stats(self) -> dict[str, int]:
        return {
            "queued_appends": self.docstore.queued,
            "queued_publishes": self.publisher.queued,
            "rooms_followed": len(self.cursors.rooms()),
            "resyncs": self.resyncs,
            "remote_updates": self.remote_updates,
            "repairs": self.repairs,
            "kicks": self.kicks,
        }


def announce_accounts_change(redis_url: str, kick: Kick | None = None) -> None:
    """After an admin command changed the accounts in PostgreSQL: tell every hub process at
    once (a kick), so a revocation acts within milliseconds, not at the next poll. Best
    effort: the processes' poll picks the change up within a second anyway."""

    async def post() -> None:
        async with connect(redis_url) as client:
            await RoomBus(client, "admin").kick(kick or Kick("accounts-changed"))

    try:
        trio.run(post)
    except (BusError, OSError) as exc:
        log.warning("hub: could not tell the hub processes at once (%s); they poll", exc)
