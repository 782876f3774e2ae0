"""HubDocs: every document of every space the hub keeps, in the Store, and those in use in memory.

Documents are keyed by (space id, doc id): `space:<space id>` for the space document, or an
environment id. In the store they live under `<space id>/<doc id>` (one log + snapshot each,
the daemon's store and its guarantees: docs/store.md).

Memory grows with what is used, not with what is stored (docs/hub.md, "Storage"): at start only
each document's sizes are read; its content is loaded from the store when something first reads
or changes it (`_loaded_entry`, the one way in), and dropped again by the sweep after two idle
checkpoints, if no client has its room open (`in_use`) and nothing of it waits for the disk or
the relay. Its sizes stay known, so limits, `has`, `size` and `env_count` never load anything.
While it is loaded and unchanged, its whole state is kept encoded for the clients that join
(`_Entry.whole_state`): a new document made by one upload keeps that upload, and a compaction
its snapshot, so no joining client waits for a 15 MB environment to be encoded again.
A store on a server (a cluster's PostgreSQL) is read ahead off the event loop (`needs_read`,
`load_ahead`), and when it is away (`StoreUnavailable`) the document stays known, to be read
once it answers: only a document whose bytes are unreadable is skipped.

Why the relay does not wait for the disk (docs/hub.md, "Durability"): `apply()` changes the
in-memory document and enqueues the update (group commit); `run()` hands it to the listeners
(the rooms, the daemons) at once, while the store commits it alongside. Nobody waits for an
acknowledgement from the hub (y-websocket has none, a daemon keeps its own store), every
receiver keeps what it got, and the Yjs sync of the next connection brings back anything a
crashed hub had not written: nothing is lost for good. A write that fails is written again
(never relayed twice). Listeners are called in apply order; the flush listeners after each
batch, so a room can merge the updates of one batch into one message.

Limits are checked in `apply()` before anything changes: a new environment in a full space
(`quota-exceeded`), or an update whose new content would take an environment past its byte
limit (`environment-too-large`) raises `LimitExceeded` and leaves the document, the store and
every other document as they were.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from pycrdt import Doc, Map, get_update

from ..core.events import EventLog
from ..model.lib0 import EMPTY_UPDATE
from ..spaces import ENVIRONMENTS, SHARED
from ..store import Store, StoreError, Ticket
from .accounts import LimitExceeded, Limits

__all__ = [
    "EMPTY_STATE_VECTOR",
    "EMPTY_UPDATE",
    "SPACE_PREFIX",
    "HubDocs",
    "LimitExceeded",
    "StoreUnavailable",
]

log = logging.getLogger("peerdaemon.hub.docs")

SPACE_PREFIX = "space:"
FILES_PREFIX = "files:"
"""An environment's external files (core/attachments.py): stored beside it, not counted as one."""
EMPTY_STATE_VECTOR = b"\x00"


class StoreUnavailable(Exception):
    """The store cannot be read right now (its server is away): the document exists and is not
    forgotten; the caller tries again later. Raised by a store's `updates_of` (and so by
    every HubDocs method that loads a document), unlike a document whose bytes are unreadable,
    which is skipped as if it were not stored."""


_SPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DOC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

Listener = Callable[[str, str, bytes, str], None]
"""(space id, doc id, update, origin): an applied change of a document (its commit may
still be under way: docs/hub.md, "Durability")."""


def check_ids(space_id: str, doc_id: str) -> None:
    """ValueError unless the ids are well-formed (and a space document belongs to its space)."""
    if not isinstance(space_id, str) or not _SPACE_RE.fullmatch(space_id):
        raise ValueError(f"invalid space id {space_id!r}")
    if not isinstance(doc_id, str) or not _DOC_RE.fullmatch(doc_id):
        raise ValueError(f"invalid document id {doc_id!r}")
    if doc_id.startswith(SPACE_PREFIX) and doc_id != SPACE_PREFIX + space_id:
        raise ValueError(f"{doc_id!r} is not the space document of space {space_id!r}")


class _Entry:
    """A stored document: its sizes always, its content (`doc`) while it is loaded."""

    __slots__ = (
        "space",
        "doc_id",
        "key",
        "doc",
        "_subscription",
        "pending",
        "size",
        "snapshot_bytes",
        "rows_since",
        "bytes_since",
        "last_ticket",
        "idle",
        "unstored",
        "whole",
    )

    def __init__(self, space: str, doc_id: str, doc: Doc | None = None) -> None:
        self.space = space
        self.doc_id = doc_id
        self.key = f"{space}/{doc_id}"
        self.doc: Doc | None = None
        self._subscription: Any = None
        self.pending: list[bytes] = []  # updates of the transaction(s) just applied
        self.size = 0  # stored bytes: snapshot + log since (an upper bound of the state's size)
        self.snapshot_bytes = 0
        self.rows_since = 0
        self.bytes_since = 0
        self.last_ticket: Ticket | None = None
        self.idle = 0  # sweeps since it was last used
        self.unstored = False  # holds an update the store failed to write: never dropped
        self.whole: bytes | None = None  # the whole state as one update (`apply` drops it)
        if doc is not None:
            self.attach(doc)

    def attach(self, doc: Doc) -> None:
        self.doc = doc
        self._subscription = doc.observe(self._on_transaction)

    def detach(self) -> None:
        if self.doc is not None and self._subscription is not None:
            self.doc.unobserve(self._subscription)
        self.doc = self._subscription = self.whole = None

    def _on_transaction(self, event: Any) -> None:
        update = event.update
        if update != EMPTY_UPDATE:
            self.pending.append(update)

    def whole_state(self) -> bytes:
        """The whole state as one update, encoded once for every client that asks for it (a
        joining client, a reconnect storm): encoding a 15 MB environment takes tens of ms."""
        assert self.doc is not None
        if self.whole is None:
            self.whole = self.doc.get_update()
        return self.whole


@dataclass(slots=True)
class _Relay:
    ticket: Ticket
    space: str
    doc_id: str
    update: bytes
    origin: str
    attempts: int = 1


_STORED = Ticket()
_STORED._complete()  # what another process stores: nothing to wait for here

MAX_STORE_ATTEMPTS = 3
SWEEP_INTERVAL = 30.0
"""Seconds between idle checkpoints: a document unused for two of them is dropped from memory
(the default of the hub's `store.sweep_interval`, hub/config.py)."""
IDLE_SWEEPS = 2


class HubDocs:
    """The hub's documents; all methods but `run`/`wait_durable` are synchronous (trio thread).

    `limits(space_id) -> Limits` (optional) gives the limits of a space's documents; without it
    nothing is limited. `in_use(space_id, doc_id)` (optional, settable): whether clients hold the
    document open (a y-websocket room), which keeps it loaded. `sweep_interval`: seconds
    between idle checkpoints (None: documents stay loaded once used).
    """

    def __init__(
        self,
        store: Store,
        events: EventLog,
        *,
        limits: Callable[[str], Limits] | None = None,
        compact_count: int = 1000,
        compact_bytes: int = 8 << 20,
        in_use: Callable[[str, str], bool] | None = None,
        sweep_interval: float | None = SWEEP_INTERVAL,
    ) -> None:
        self.store = store
        self.events = events
        self.limits = limits
        self.compact_count = compact_count
        self.compact_bytes = compact_bytes
        self.in_use = in_use
        self.sweep_interval = sweep_interval
        self._docs: dict[tuple[str, str], _Entry] = {}  # every stored document
        self._loaded: dict[tuple[str, str], _Entry] = {}  # those whose content is in memory
        self._by_space: dict[str, dict[str, _Entry]] = {}
        self._relay: deque[_Relay] = deque()
        self._relay_wakeup = trio.Event()
        self._watch: deque[_Relay] = deque()  # relayed, their store writes not confirmed yet
        self._watch_wakeup = trio.Event()
        self._listeners: dict[int, Listener] = {}
        self._ahead: dict[str, list[bytes]] = {}  # read by `load_ahead`, for `_loaded_entry`
        self._flush_listeners: dict[int, Callable[[], None]] = {}
        self._next_token = 1
        # counters for /metrics (docs/hub.md, "Metrics")
        self.stored_bytes = 0  # the sum of every document's `size`
        self.relayed = 0  # updates handed to the listeners, since start
        self.relayed_bytes = 0
        self.loads = 0  # documents read from the store since start
        self.evictions = 0  # and dropped from memory again

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> int:
        """Learn every stored document and its sizes (not its content); returns how many."""
        for key, (snapshot, rows, nbytes) in self.store.sizes().items():
            space, sep, doc_id = key.partition("/")
            if not sep:
                log.warning("hub store: ignoring %r (not <space>/<doc>)", key)
                continue
            entry = self._add(_Entry(space, doc_id))
            entry.snapshot_bytes = snapshot
            entry.rows_since = rows
            entry.bytes_since = nbytes
            entry.size = snapshot + nbytes
            self.stored_bytes += entry.size
        return len(self._docs)

    def _add(self, entry: _Entry) -> _Entry:
        self._docs[(entry.space, entry.doc_id)] = entry
        self._by_space.setdefault(entry.space, {})[entry.doc_id] = entry
        return entry

    def _loaded_entry(self, space_id: str, doc_id: str) -> _Entry | None:
        """The document with its content in memory (read from the store if it was not), or
        None if it is not stored. Every reader of a document's content comes through here;
        StoreUnavailable (the store away) leaves the document known, to be read later."""
        entry = self._docs.get((space_id, doc_id))
        if entry is None:
            return None
        entry.idle = 0
        if entry.doc is None:
            doc = Doc()
            try:
                updates = self._ahead.pop(entry.key, None)
                if updates is None:
                    updates = self.store.updates_of(entry.key)
                for update in updates:
                    doc.apply_update(update)
            except StoreUnavailable:
                # the store is away, the document is not gone: it stays known (sizes, limits,
                # `has`) and is read when the store answers again
                raise
            except Exception as exc:
                # as if it were not stored (a client's next update starts it again)
                log.error("hub store: %s is unreadable (%s); skipped", entry.key, exc)
                self._forget(entry)
                return None
            entry.attach(doc)
            self._loaded[(space_id, doc_id)] = entry
            self.loads += 1
        return entry

    def needs_read(self, space_id: str, doc_id: str) -> bool:
        """Whether using the document now would read a store that may block the event loop
        (one with `read_updates`: PostgreSQL), i.e. `load_ahead` should come first."""
        entry = self._docs.get((space_id, doc_id))
        return (
            entry is not None
            and entry.doc is None
            and entry.key not in self._ahead
            and getattr(self.store, "read_updates", None) is not None
        )

    async def load_ahead(
        self, space_id: str, doc_id: str, then: Callable[[], object] | None = None
    ) -> None:
        """Read a stored document that is not in memory in a worker thread (the store's
        `read_updates`), then load it (or run `then()`, which loads it by using it), so its
        first use does not wait on the store in the event loop. StoreUnavailable if the store
        cannot be read now (nothing is forgotten: try again later)."""
        entry = self._docs.get((space_id, doc_id))
        read = getattr(self.store, "read_updates", None)
        if entry is not None and entry.doc is None and read is not None:
            try:
                updates = await read(entry.key)
            except Exception as exc:
                raise StoreUnavailable(f"{entry.key}: {exc}") from None
            if self._docs.get((space_id, doc_id)) is entry and entry.doc is None:
                self._ahead[entry.key] = updates
        try:
            if then is not None:
                then()
            else:
                self._loaded_entry(space_id, doc_id)
        finally:
            if entry is not None:
                self._ahead.pop(entry.key, None)

    def _forget(self, entry: _Entry) -> None:
        entry.detach()
        key = (entry.space, entry.doc_id)
        self._docs.pop(key, None)
        self._loaded.pop(key, None)
        docs = self._by_space.get(entry.space)
        if docs is not None:
            docs.pop(entry.doc_id, None)
            if not docs:
                del self._by_space[entry.space]
        self.stored_bytes -= entry.size

    # -- memory ----------------------------------------------------------------------------------
    def sweep(self) -> int:
        """One idle checkpoint: drop the content of documents unused since the last two, that
        no client holds open and with nothing waiting for the disk or the relay (it stays in
        the store and is read again when next needed). Returns how many were dropped."""
        in_flight = {(r.space, r.doc_id) for queue in (self._relay, self._watch) for r in queue}
        dropped = 0
        for key, entry in list(self._loaded.items()):
            busy = (
                key in in_flight
                or entry.pending
                or entry.unstored
                or (entry.last_ticket is not None and not entry.last_ticket.latest.done)
                or (self.in_use is not None and self.in_use(*key))
            )
            if busy:
                entry.idle = 0
                continue
            entry.idle += 1
            if entry.idle >= IDLE_SWEEPS:
                entry.detach()
                entry.last_ticket = None
                del self._loaded[key]
                dropped += 1
        self.evictions += dropped
        return dropped

    async def _sweep_loop(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                self.sweep()
            except Exception:  # the documents stay loaded; nothing is lost
                log.exception("hub: sweeping idle documents failed")

    # -- reading ---------------------------------------------------------------------------------
    def has(self, space_id: str, doc_id: str) -> bool:
        return (space_id, doc_id) in self._docs

    def spaces(self) -> list[str]:
        """Spaces that hold at least one document."""
        return sorted(self._by_space)

    def doc_ids(self, space_id: str) -> list[str]:
        """Every document stored in a space (its space document and environments)."""
        return sorted(self._by_space.get(space_id, {}))

    def state_vector(self, space_id: str, doc_id: str) -> bytes:
        entry = self._loaded_entry(space_id, doc_id)
        return entry.doc.get_state() if entry is not None and entry.doc else EMPTY_STATE_VECTOR

    def diff(self, space_id: str, doc_id: str, state_vector: bytes) -> bytes:
        """What a holder of `state_vector` lacks; ValueError on a bad state vector."""
        entry = self._loaded_entry(space_id, doc_id)
        if entry is None or entry.doc is None:
            if state_vector != EMPTY_STATE_VECTOR:
                Doc().get_update(state_vector)  # still reject garbage
            return EMPTY_UPDATE
        if state_vector == EMPTY_STATE_VECTOR:
            return entry.whole_state()
        try:
            return entry.doc.get_update(state_vector)
        except Exception as exc:
            raise ValueError(f"bad state vector: {exc}") from None

    def env_ids(self, space_id: str) -> list[str]:
        """Environments listed as shared in the space document (docs/spaces.md)."""
        entry = self._loaded_entry(space_id, SPACE_PREFIX + space_id)
        if entry is None or entry.doc is None:
            return []
        out = []
        for env_id, value in entry.doc.get(ENVIRONMENTS, type=Map).items():
            if isinstance(value, dict) and value.get("state") == SHARED:
                out.append(env_id)
        return sorted(out)

    def size(self, space_id: str, doc_id: str) -> int:
        """Bytes the document takes in the store: the size `bytes_per_env` limits."""
        entry = self._docs.get((space_id, doc_id))
        return entry.size if entry is not None else 0

    def env_count(self, space_id: str) -> int:
        docs = self._by_space.get(space_id, {})
        return sum(1 for doc_id in docs if not doc_id.startswith((SPACE_PREFIX, FILES_PREFIX)))

    def get_doc(self, space_id: str, doc_id: str) -> Doc | None:
        """The live document, to read at once (exports, tests): loaded if it was not, and
        possibly dropped at a later sweep, so do not keep it. Change it only through `apply`."""
        entry = self._loaded_entry(space_id, doc_id)
        return entry.doc if entry is not None else None

    def is_loaded(self, space_id: str, doc_id: str) -> bool:
        """Whether the document's content is in memory now (metrics, tests)."""
        return (space_id, doc_id) in self._loaded

    def pending_ticket(self, space_id: str, doc_id: str) -> Ticket | None:
        """The ticket of the document's last append if it is not durable yet, else None."""
        entry = self._docs.get((space_id, doc_id))
        ticket = entry.last_ticket.latest if entry is not None and entry.last_ticket else None
        return None if ticket is None or ticket.done else ticket

    async def wait_durable(self, space_id: str, doc_id: str) -> None:
        """Until everything applied to the document so far is durable (e.g. before a diff)."""
        ticket = self.pending_ticket(space_id, doc_id)
        if ticket is not None:
            try:
                await ticket.wait()
            except StoreError:
                pass  # logged by the store; the caller goes on with what is in memory

    # -- changing --------------------------------------------------------------------------------
    def apply(
        self, space_id: str, doc_id: str, update: bytes, origin: str, *, remote: bool = False
    ) -> Ticket | None:
        """Apply a Yjs update (creating the document); the ticket of its last append, or None
        if it changed nothing. ValueError on bad ids or bytes, LimitExceeded on a limit.
        `remote`: another hub process of a cluster accepted it and stores it (its bus entry,
        hub/cluster/rooms.py): relayed to the listeners, but not limited, stored nor compacted."""
        check_ids(space_id, doc_id)
        update = bytes(update)
        reloaded = (space_id, doc_id) in self._docs and (space_id, doc_id) not in self._loaded
        entry = self._loaded_entry(space_id, doc_id)
        if self.limits is not None and not remote:
            self._check_limits(space_id, doc_id, entry, update, origin)
        created = entry is None
        if entry is None:
            entry = _Entry(space_id, doc_id, Doc())
        assert entry.doc is not None
        # Whatever happens below may change the document, reported or not (an update after a
        # clock gap is integrated quietly: core/registry.py), so the cached whole state goes.
        entry.whole = None
        try:
            entry.doc.apply_update(update)
        except Exception as exc:  # pycrdt raises ValueError on undecodable bytes
            entry.pending.clear()
            raise ValueError(f"not a Yjs update: {exc}") from None
        if created and entry.pending == [update]:
            # A new document made by exactly this update, which it reported back byte for byte
            # (a client's whole-state upload): that update is its whole state, so the first
            # client to join gets it without an encoding of the whole document.
            entry.whole = update
        if not entry.pending:
            if remote and reloaded:
                # Read back from the store just now, which the other process had already
                # committed it to: new to this process's listeners all the same (a daemon
                # following an idle document), and a duplicate is harmless to a Yjs receiver.
                self._relay.append(_Relay(_STORED, space_id, doc_id, update, origin))
                self._relay_wakeup.set()
            return None  # nothing new (a duplicate, or only structs still missing a dependency)
        if created:
            self._add(entry)
            self._loaded[(space_id, doc_id)] = entry
            self.events.emit("hub-doc-created", space=space_id, doc=doc_id, origin=origin)
        updates, entry.pending = entry.pending, []
        for u in updates:
            ticket = _STORED if remote else self.store.enqueue_append(entry.key, u)
            entry.last_ticket = ticket
            entry.size += len(u)
            self.stored_bytes += len(u)
            entry.rows_since += 1
            entry.bytes_since += len(u)
            self._relay.append(_Relay(ticket, space_id, doc_id, u, origin))
        self._relay_wakeup.set()
        if remote:
            return entry.last_ticket
        # Compact after `compact_count` rows, or once the log outweighs the snapshot (and
        # `compact_bytes`); never for a single row (a big first upload), which gains nothing.
        if entry.rows_since > 1 and (
            entry.rows_since >= self.compact_count
            or entry.bytes_since >= max(self.compact_bytes, entry.snapshot_bytes)
        ):
            self._compact(entry)
        return entry.last_ticket

    def _check_limits(
        self, space_id: str, doc_id: str, entry: _Entry | None, update: bytes, origin: str
    ) -> None:
        assert self.limits is not None
        limits = self.limits(space_id)
        try:
            if entry is None:
                if not doc_id.startswith((SPACE_PREFIX, FILES_PREFIX)) and (
                    self.env_count(space_id) >= limits.envs_per_space
                ):
                    raise LimitExceeded(
                        "quota-exceeded",
                        f"space {space_id} already holds {self.env_count(space_id)} "
                        f"environment(s) (limit {limits.envs_per_space})",
                    )
                new = len(update)
            elif entry.size + len(update) <= limits.bytes_per_env:
                return  # the new content cannot be larger than the update: no need to diff
            else:
                assert entry.doc is not None  # (`apply` loaded it)
                try:
                    new = len(get_update(update, entry.doc.get_state()))
                except ValueError as exc:
                    raise ValueError(f"not a Yjs update: {exc}") from None
                if new <= len(EMPTY_UPDATE):
                    return
            size = entry.size if entry is not None else 0
            if size + new > limits.bytes_per_env:
                raise LimitExceeded(
                    "environment-too-large",
                    f"{doc_id} would hold {size + new} bytes (limit {limits.bytes_per_env})",
                )
        except LimitExceeded as exc:
            self.events.emit(
                "limit-exceeded", space=space_id, doc=doc_id, reason=exc.reason, origin=origin
            )
            raise

    def _compact(self, entry: _Entry) -> None:
        snapshot = entry.whole_state()  # (`apply` loaded it)
        self.store.enqueue_compact(entry.key, snapshot)
        self.stored_bytes += len(snapshot) - entry.size
        entry.size = entry.snapshot_bytes = len(snapshot)
        entry.rows_since = entry.bytes_since = 0

    # -- followers -------------------------------------------------------------------------------
    def add_listener(self, fn: Listener) -> int:
        """`fn(space, doc, update, origin)` for every change, in order (not waiting for the
        store: see the module's docstring)."""
        token = self._token()
        self._listeners[token] = fn
        return token

    def remove_listener(self, token: int) -> None:
        self._listeners.pop(token, None)
        self._flush_listeners.pop(token, None)

    def add_flush_listener(self, fn: Callable[[], None]) -> int:
        """`fn()` after each batch of listener calls (changes applied together)."""
        token = self._token()
        self._flush_listeners[token] = fn
        return token

    def _token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The relay, and the watch over the store's writes of what it relayed."""
        # pycrdt's first Doc in an event loop loads anyio's backend for it (10-20 ms here):
        # now, not while the clients of the first document created wait for its first edit.
        Doc()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._confirm)
            if self.sweep_interval is not None:
                nursery.start_soon(self._sweep_loop, self.sweep_interval)
            task_status.started()
            await self._relay_loop()

    async def _relay_loop(self) -> None:
        """Hand each batch of applied updates to the listeners, then the flush listeners."""
        relay = self._relay
        while True:
            if not relay:
                self._relay_wakeup = trio.Event()
                await self._relay_wakeup.wait()
                continue
            while relay:
                item = relay.popleft()
                self.relayed += 1
                self.relayed_bytes += len(item.update)
                for fn in list(self._listeners.values()):
                    try:
                        fn(item.space, item.doc_id, item.update, item.origin)
                    except Exception:
                        log.exception("hub: update listener failed")
                self._watch.append(item)
            self._watch_wakeup.set()
            self._flushed()
            await trio.lowlevel.checkpoint()

    async def _confirm(self) -> None:
        """Follow the store's tickets of relayed updates, in order: a failed write is written
        again (`_store_failed`)."""
        watch = self._watch
        while True:
            if not watch:
                self._watch_wakeup = trio.Event()
                await self._watch_wakeup.wait()
                continue
            head = watch[0].ticket
            if not head.done:
                try:
                    await head.wait()
                except StoreError:
                    pass
            confirmed = False
            while watch and watch[0].ticket.done:
                item = watch.popleft()
                if item.ticket.failed:
                    self._store_failed(item)
                else:
                    confirmed = True
            if confirmed:  # what waited for durability (a new client's step 1) may go now
                self._flushed()

    def _flushed(self) -> None:
        for fn in list(self._flush_listeners.values()):
            try:
                fn()
            except Exception:
                log.exception("hub: flush listener failed")

    def _store_failed(self, item: _Relay) -> None:
        """A write failed (disk full, I/O error): it is in memory (and relayed) but not on disk.
        The store tries again by itself when the failure may pass (`retry`: watch that attempt);
        otherwise enqueue it again (Yjs does not mind the order), a few times."""
        entry = self._docs.get((item.space, item.doc_id))
        if entry is not None and item.ticket.retry is not None:
            item.ticket = item.ticket.retry
            self._watch.append(item)
            return
        if entry is None or item.attempts >= MAX_STORE_ATTEMPTS:
            if entry is not None:
                entry.unstored = True  # in memory only: keep it there
            log.error(
                "hub: %s/%s: an update could not be stored; it is in memory only until a"
                " client sends it again",
                item.space,
                item.doc_id,
            )
            self.events.emit("store-error", space=item.space, doc=item.doc_id)
            return
        log.warning("hub: %s/%s: store write failed; retrying", item.space, item.doc_id)
        item.ticket = self.store.enqueue_append(entry.key, item.update)
        item.attempts += 1
        entry.last_ticket = item.ticket
        self._watch.append(item)

    def stats(self) -> dict[str, int]:
        return {
            "documents": len(self._docs),
            "loaded": len(self._loaded),
            "spaces": len(self._by_space),
            "relay_queued": len(self._relay) + len(self._watch),  # not on disk for sure yet
            "unconfirmed": len(self._watch),
        }
