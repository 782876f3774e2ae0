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

Loading a document is a synchronous read in the trio thread (HubDocs' `_loaded_entry` is
synchronous): a large load holds up this process's other rooms while it runs.
"""

from __future__ import annotations

import logging
import secrets
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
from ..accounts import Limits
from ..docs import FILES_PREFIX, SPACE_PREFIX, HubDocs
from ..ywebsocket import Framer, Room, Rooms, YConn
from .accounts import ClusterAccounts
from .bus import BusError, CompactionLock, RoomBus, connect
from .devices import ClusterDevices
from .protocol import ALIVE_TTL_MS, AWARENESS, UPDATE, BusEntry, Cursors, Kick, room_of
from .store import AppendTicket, DocStore, DocStoreError, _Connection, _load
from .worker import Publisher, compact_room

__all__ = [
    "ClusterDocs",
    "ClusterNode",
    "ClusterRooms",
    "ClusterStore",
    "announce_accounts_change",
]

log = logging.getLogger("peerdaemon.hub.cluster")


def _new_identity() -> dict[str, Any]:
    identity = Identity.generate("hub")  # (its public key kept too: core/identity.py)
    return {
        "private_key": identity.private_bytes(),
        "public_key": identity.public_key,
        "name": "hub",
    }


def _split(key: str) -> tuple[str, str]:
    space, _, doc = key.partition("/")
    return space, doc


class ClusterStore:
    """The store `HubDocs` writes to in scaled mode (the subset of `store.Store` it uses)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.docstore = node.docstore
        self._loader = _Connection(node.dsn, name="loader")
        self._sizes: dict[tuple[str, str], int] = {}
        self._settings: dict[str, Any] = {}
        self._tickets: deque[tuple[AppendTicket, Ticket]] = deque()
        self._tickets_wakeup = trio.Event()
        self._compacting: set[str] = set()
        self.commit_times = CommitTimes()

    async def prefetch(self) -> None:
        self._sizes = await self.docstore.sizes()

        def read(conn: Any) -> dict[str, Any]:
            rows = conn.execute("SELECT key, value FROM settings").fetchall()
            return {str(k): cbor2.loads(bytes(v)) for k, v in rows}

        self._settings = await self.docstore.sql(read)

    # -- what HubDocs reads ----------------------------------------------------------------------
    def sizes(self) -> dict[str, tuple[int, int, int]]:
        return {f"{s}/{d}": (n, 0, 0) for (s, d), n in self._sizes.items()}

    def env_count(self, space_id: str) -> int:
        """Environments stored in the space, cluster-wide (not its space document or files)."""

        def count(conn: Any) -> int:
            row = conn.execute(
                "SELECT count(*) FROM documents WHERE space = %s"
                " AND doc NOT LIKE 'space:%%' AND doc NOT LIKE 'files:%%'",
                (space_id,),
            ).fetchone()
            return int(row[0]) if row else 0

        return self._loader._run(count)

    def updates_of(self, key: str) -> list[bytes]:
        space, doc = _split(key)
        loaded = self._loader._run(lambda conn: _load(conn, space, doc))
        return loaded.updates if loaded is not None else []

    # -- what HubDocs writes ---------------------------------------------------------------------
    def enqueue_append(self, key: str, update: bytes) -> Ticket:
        space, doc = _split(key)
        origin = self.node.bus.origin("hub")
        appended = self.docstore.append(space, doc, update, origin)
        self.node.publisher.update(room_of(space, doc), update, origin)
        ticket = Ticket()
        self._tickets.append((appended, ticket))
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
            await compact_room(
                self.node.bus, self.node.lock, self.docstore, space, doc,
                commit_lag_ms=self.node.commit_lag_ms,
            )  # fmt: skip
        except (BusError, DocStoreError) as exc:
            log.warning("hub: compaction of %s postponed: %s", key, exc)
        finally:
            self._compacting.discard(key)

    async def follow_tickets(self) -> None:
        """Complete HubDocs' tickets as PostgreSQL commits (in order: the writer commits so)."""
        while True:
            if not self._tickets:
                self._tickets_wakeup = trio.Event()
                await self._tickets_wakeup.wait()
                continue
            appended, ticket = self._tickets[0]
            error: BaseException | None = None
            try:
                await appended.wait()
            except DocStoreError as exc:
                error = StoreError(str(exc))
            self._tickets.popleft()
            ticket._complete(error)

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

    def close(self) -> None:
        self._loader.close()


class ClusterDocs(HubDocs):
    """`HubDocs` whose `envs_per_space` count is the cluster's: a document created by another
    process since this one started is in PostgreSQL, not in this process's list. Asked only when
    a document is created (a read in the trio thread); two processes creating at the same
    moment may pass the limit by one each."""

    store: ClusterStore

    def env_count(self, space_id: str) -> int:
        local = super().env_count(space_id)
        try:
            return max(local, self.store.env_count(space_id))
        except Exception as exc:  # PostgreSQL away: what this process knows
            log.warning("hub: cannot count the environments of %s: %s", space_id, exc)
            return local


class ClusterRooms(Rooms):
    """`Rooms` that tell the node which rooms are open on this process, and publish the
    awareness their clients send."""

    def __init__(self, docs: Any, framer: Framer, node: ClusterNode) -> None:
        super().__init__(docs, framer)
        self.node = node

    def join(self, space_id: str, doc_id: str, conn: YConn) -> Room:
        new = (space_id, doc_id) not in self.rooms
        if new:
            self.node.opening(space_id, doc_id)
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

    def leave(self, conn: YConn) -> None:
        room = conn.room
        super().leave(conn)
        if room is not None and room.key not in self.rooms:
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
        self.wake: Callable[[], None] = lambda: None
        """Have the connections given something to send (awareness) write it (`YjsEndpoint`)."""
        self.accounts: ClusterAccounts | None = None
        self.devices: ClusterDevices | None = None
        self.peer_endpoint: object = None
        """The daemons' endpoint (`peers.PeerEndpoint`): the documents its daemons sync are
        followed too."""
        self._daemon_rooms: set[str] = set()
        self._peers: dict[str, set[str]] = {}  # other processes read -> their rooms
        self._missing: set[str] = set()  # peers whose heartbeat was missing at the last check
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
        self._reader_client = await self._stack.enter_async_context(connect(self.redis_url))
        self.bus = RoomBus(writer, self.process)
        self.read_bus = RoomBus(self._reader_client, self.process)
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
        self.docstore.close()

    docs_class = ClusterDocs

    def rooms_for(self, docs: HubDocs, framer: Framer) -> ClusterRooms:
        """The rooms of this process, hooked to the node (server.py's seam)."""
        rooms = ClusterRooms(docs, framer, self)
        self.docs = docs
        self.rooms = rooms
        return rooms

    # -- rooms opening and closing on this process ------------------------------------------------
    def opening(self, space_id: str, doc_id: str) -> None:
        """A room's first client here: bring the document up to what PostgreSQL holds (it may
        be new to this process, or loaded from earlier but not followed since), then read its
        streams from their start, which hold whatever may not be committed yet."""
        try:
            room = room_of(space_id, doc_id)
        except ValueError:
            return
        docs = self.docs
        assert docs is not None
        if room in self.cursors.rooms():
            return
        if not docs.has(space_id, doc_id) or docs.is_loaded(space_id, doc_id):
            try:
                updates = self.store.updates_of(room)
            except Exception as exc:  # PostgreSQL away: the stream and the clients' syncs
                log.warning("hub: cannot load %s from postgresql: %s", room, exc)
                updates = []
            if updates:
                self._apply_remote(space_id, doc_id, merge_updates(*updates), "postgres")
        self.cursors.add(room)
        self._changed.set()

    def closed(self, space_id: str, doc_id: str) -> None:
        room = room_of(space_id, doc_id)
        if room not in self._daemon_rooms:
            self.cursors.remove(room)
            self._changed.set()

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
        for space in {s for d in daemons() for s in d.get("spaces", ())}:
            docs = [SPACE_PREFIX + space]
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
            try:
                wanted = self.daemon_rooms()
            except Exception:
                log.exception("hub: listing the daemons' documents failed")
                wanted = self._daemon_rooms
            open_here = set()
            if self.rooms is not None:
                open_here = {room_of(*key) for key in self.rooms.rooms}
            for room in sorted(wanted - self._daemon_rooms):
                self.opening(*_split(room))
            self._daemon_rooms = wanted
            for room in set(self.cursors.rooms()) - wanted - open_here:
                self.cursors.remove(room)
                self._changed.set()
            await trio.sleep(every)

    def publish_awareness(self, space_id: str, doc_id: str, payload: bytes) -> None:
        self.publisher.awareness(room_of(space_id, doc_id), payload, self.bus.origin("yws"))

    def _apply_remote(self, space_id: str, doc_id: str, update: bytes, origin: str) -> None:
        assert self.docs is not None
        try:
            self.docs.apply(space_id, doc_id, update, origin, remote=True)
        except ValueError as exc:
            log.warning("hub: %s/%s: bad update from the bus: %s", space_id, doc_id, exc)

    # -- the reader ------------------------------------------------------------------------------
    def deliver(self, entries: list[BusEntry]) -> None:
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
        try:
            self.accounts.refresh()
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

    async def on_lost(self) -> None:
        """Redis restarted empty: take what PostgreSQL has, and give the new streams what
        PostgreSQL lacks of each open room (uncommitted updates, ours and others')."""
        self.resyncs += 1
        docs = self.docs
        assert docs is not None
        for room in self.cursors.rooms():
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
                await self.bus.heartbeat(ALIVE_TTL_MS)
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
            doc = self.docs.get_doc(space_id, doc_id) if self.docs is not None else None
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

    async def _read(self) -> None:
        """Follow the open rooms' streams; a room opened or closed restarts the blocking read."""
        while True:
            self._changed = trio.Event()
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    await self.read_bus.follow(
                        self.cursors, self.deliver, on_lost=self._on_lost, block_ms=self.block_ms
                    )

                nursery.start_soon(follow)
                await self._changed.wait()
                nursery.cancel_scope.cancel()

    async def _on_lost(self) -> None:
        with trio.CancelScope(shield=True):
            await self.on_lost()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.docstore.run)
            await nursery.start(self.publisher.run)
            nursery.start_soon(self.store.follow_tickets)
            nursery.start_soon(self._read)
            nursery.start_soon(self._heartbeat)
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
