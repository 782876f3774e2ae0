"""The y-websocket protocol on the hub, without I/O: message codec, rooms, awareness, fan-out.

A room is one document (`/yjs/SPACE/DOC`). Its connections are `YConn`s: state plus an `Outbox`
of ready-to-write frames. Nothing here writes or stores: the rooms queue frames, and the shell
(`yjs.py`, `transport.py`) learns from the shared `ready` list which connections have something
to write, and acts on the events `Rooms.receive` returns. Why it is shaped so:

* The server speaks first (sync step 1), answers a client's step 1 with step 2 at once, and
  hands the client's step 2 and updates back as a `StoreUpdate` event; the shell applies it to
  `HubDocs` (or reports a refusal with `Rooms.update_refused`), which relays it back here as
  soon as it is applied, its store committing it alongside (`Rooms.on_update` /
  `Rooms.flush`; docs/hub.md, "Durability"), to every connection but its origin. Updates
  applied in one batch that came from the same origin are merged into one message, encoded
  ONCE, and the same frame bytes go to every recipient.
* Awareness is relayed (to the whole room, the sender included) only for entries whose clock
  advanced, or the removal of a known state: y-websocket clients re-send every awareness
  update they apply, so relaying blindly turns one join into O(N^2) messages. A connection's
  awareness clients are removed (and the removal broadcast) when it goes away.
* A slow reader never stalls the room: its outbox grows; past `coalesce_bytes` its queued
  document updates of a room are merged into one (pycrdt `merge_updates`); past `limit_bytes`
  it is dropped with close code 1013 `too-slow`.

Wire format (y-protocols): varuint message type, then
  0 sync:      varuint sub (0 step1 + varbytes state vector, 1 step2 / 2 update + varbytes update)
  1 awareness: varbytes(varuint n, n x (varuint client, varuint clock, varstring JSON state))
  2 auth:      varuint 0 (permission denied) + varstring reason
  3 query awareness (no payload)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from pycrdt import merge_updates

from ..core.awareness import MAX_STATE, AwarenessEntry, AwarenessError, encode_awareness
from ..core.awareness import decode_awareness as _decode_awareness
from ..model.lib0 import EMPTY_UPDATE, BadVarUint, write_var_uint
from ..model.lib0 import read_var_uint as lib0_read_var_uint

__all__ = [
    "AWARENESS_TIMEOUT",
    "CLOSE_CODES",
    "MSG_AUTH",
    "MSG_AWARENESS",
    "MSG_QUERY_AWARENESS",
    "MSG_SYNC",
    "QUERY_AWARENESS",
    "SYNC_STEP1",
    "SYNC_STEP2",
    "SYNC_UPDATE",
    "AwarenessEntry",
    "Frame",
    "Message",
    "ClientProtocolError",
    "Outbox",
    "Outlet",
    "Room",
    "Rooms",
    "StoreUpdate",
    "YConn",
    "awareness_message",
    "decode_awareness",
    "decode_message",
    "encode_awareness",
    "frame_size",
    "permission_denied",
    "read_var_uint",
    "sync_step1",
    "sync_step2",
    "sync_update",
    "take_ready",
    "write_var_uint",
]

log = logging.getLogger("peerdaemon.hub.yws")

MSG_SYNC = 0
MSG_AWARENESS = 1
MSG_AUTH = 2
MSG_QUERY_AWARENESS = 3
SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2
AUTH_PERMISSION_DENIED = 0

MAX_REMOVED_CLOCKS = 10_000  # awareness clocks kept for clients that left, per room
AWARENESS_TIMEOUT = 30.0
"""A client's awareness state not renewed for this long is removed (y-protocols' outdatedTimeout:
clients renew every 15 s). Without it, a connection that stays open after its page froze keeps
a ghost in everyone's presence."""

# Close codes. 4400-4499 are "permanent" for the y-websocket provider (it stops reconnecting);
# 1013 ("try again later") lets a dropped slow client reconnect and resync.
CLOSE_CODES: dict[str, int] = {
    "bad-request": 4400,
    "protocol-error": 4400,
    "bad-update": 4400,
    "unauthorized": 4401,
    "forbidden": 4403,
    "environment-too-large": 4413,
    "quota-exceeded": 4422,
    "too-many-devices": 4429,
    "too-slow": 1013,
    "too-large": 1009,
    "shutdown": 1001,
}


class ClientProtocolError(ValueError):
    """A y-websocket client sent bytes that are not a y-websocket message (its fault: the
    connection is closed with 4400 protocol-error, the room goes on)."""


# ------------------------------------------------------------------------------------- codec
def read_var_uint(data: bytes, pos: int) -> tuple[int, int]:
    """-> (value, next position); ClientProtocolError on truncation or an absurd length."""
    try:
        return lib0_read_var_uint(data, pos)
    except BadVarUint as exc:
        raise ClientProtocolError(str(exc)) from None


def _read_var_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = read_var_uint(data, pos)
    if pos + n > len(data):
        raise ClientProtocolError("truncated byte string")
    return data[pos : pos + n], pos + n


def _var_bytes(payload: bytes) -> bytes:
    return write_var_uint(len(payload)) + payload


def sync_step1(state_vector: bytes) -> bytes:
    return b"\x00\x00" + _var_bytes(state_vector)


def sync_step2(update: bytes) -> bytes:
    return b"\x00\x01" + _var_bytes(update)


def sync_update(update: bytes) -> bytes:
    return b"\x00\x02" + _var_bytes(update)


def _sync_head(sub: int, update: bytes) -> bytes:
    """The bytes before `update` in a sync message (framed with it, without copying it twice)."""
    return bytes((MSG_SYNC, sub)) + write_var_uint(len(update))


def awareness_message(awareness_update: bytes) -> bytes:
    return b"\x01" + _var_bytes(awareness_update)


def permission_denied(reason: str) -> bytes:
    return b"\x02\x00" + _var_bytes(reason.encode("utf-8"))


QUERY_AWARENESS = b"\x03"


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: `kind` (MSG_*), `sub` (sync/auth subtype or -1), `payload`."""

    kind: int
    sub: int
    payload: bytes


def decode_message(data: bytes) -> Message:
    """Decode one websocket message; unknown message types decode with an empty payload."""
    kind, pos = read_var_uint(data, 0)
    if kind == MSG_SYNC:
        sub, pos = read_var_uint(data, pos)
        if sub not in (SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE):
            raise ClientProtocolError(f"unknown sync message type {sub}")
        payload, pos = _read_var_bytes(data, pos)
        return Message(kind, sub, payload)
    if kind == MSG_AWARENESS:
        payload, pos = _read_var_bytes(data, pos)
        return Message(kind, -1, payload)
    if kind == MSG_AUTH:
        sub, pos = read_var_uint(data, pos)
        payload, pos = _read_var_bytes(data, pos) if pos < len(data) else (b"", pos)
        return Message(kind, sub, payload)
    return Message(kind, -1, b"")


def decode_awareness(payload: bytes) -> list[AwarenessEntry]:
    """Decode an awareness update (`core.awareness`); bytes that are not one are the client's
    fault."""
    try:
        return _decode_awareness(payload)
    except AwarenessError as exc:
        raise ClientProtocolError(str(exc)) from None


# ------------------------------------------------------------------------------------ outbox
Frame = bytes | tuple[bytes, ...]
"""What is written for one message: its bytes, or (a large one) its pieces in order, written
one after the other (`os.writev`) so that a large payload is never copied into a frame."""
Framer = Callable[..., Frame]
"""`framer(*parts)`: a y-websocket message given in parts -> the frame written for it (a
websocket frame in the server)."""


def _identity(*parts: bytes) -> bytes:
    return parts[0] if len(parts) == 1 else b"".join(parts)


def frame_size(frame: Frame) -> int:
    return len(frame) if isinstance(frame, bytes) else sum(len(p) for p in frame)


class Outbox:
    """A connection's queue of frames waiting for its writer.

    Items are `(frame, room key | None, update | None)`; those with an update are document
    updates of that room and may be merged (a list, not a deque: an empty deque costs 600
    bytes, times every idle connection). `nbytes` counts what is queued, not what the writer
    already took. `push` returns False when the connection should be dropped (more than
    `limit_bytes` queued even after coalescing, and more than one item: a single big message,
    such as the first sync of a large document, never counts as falling behind).

    `partial` is the unsent rest of what the writer took (a frame's tail, maybe frames after
    it); it goes out first and is never merged or dropped (the byte stream must stay
    well-formed).
    """

    __slots__ = (
        "_items",
        "nbytes",
        "coalesce_bytes",
        "limit_bytes",
        "framer",
        "coalesced",
        "partial",
    )

    def __init__(
        self,
        framer: Framer = _identity,
        *,
        coalesce_bytes: int = 1 << 20,
        limit_bytes: int = 64 << 20,
    ) -> None:
        self._items: list[tuple[Frame, object, bytes | None]] = []
        self.nbytes = 0
        self.coalesce_bytes = coalesce_bytes
        self.limit_bytes = limit_bytes
        self.framer = framer
        self.coalesced = 0  # how many times updates were merged (for stats and tests)
        self.partial: list[bytes | memoryview] | None = None

    def __len__(self) -> int:
        return len(self._items) + (self.partial is not None)

    def push(self, frame: Frame, key: object = None, update: bytes | None = None) -> bool:
        self._items.append((frame, key, update))
        self.nbytes += len(frame) if isinstance(frame, bytes) else frame_size(frame)
        if self.nbytes > self.coalesce_bytes and len(self._items) > 1:
            self.coalesce()
            if self.nbytes > self.limit_bytes and len(self._items) > 1:
                return False
        return True

    def coalesce(self) -> None:
        """Merge the queued updates of each room into one, at the place of the first."""
        groups: dict[object, list[int]] = {}
        for i, item in enumerate(self._items):
            if item[2] is not None:
                groups.setdefault(item[1], []).append(i)
        items: list[tuple[Frame, object, bytes | None] | None] = list(self._items)
        merged_any = False
        for key, places in groups.items():
            if len(places) < 2:
                continue
            update = merge_updates(*(self._items[i][2] for i in places))
            items[places[0]] = (self.framer(_sync_head(SYNC_UPDATE, update), update), key, update)
            for i in places[1:]:
                items[i] = None  # dropped below
            merged_any = True
        if merged_any:
            self._items = [item for item in items if item is not None]
            self.nbytes = sum(frame_size(item[0]) for item in self._items) + self._partial_size()
            self.coalesced += 1

    def take(self) -> list[bytes | memoryview]:
        """Everything queued, in order, as the buffers to write (the writer's next batch)."""
        items = self._items
        if not items and self.partial is None:
            return []
        frames: list[bytes | memoryview]
        if len(items) == 1 and isinstance(items[0][0], bytes):
            frames = [items[0][0]]
        else:
            frames = []
            for item in items:
                frame = item[0]
                if isinstance(frame, bytes):
                    frames.append(frame)
                else:
                    frames.extend(frame)
        if self.partial is not None:
            frames[:0] = self.partial
            self.partial = None
        items.clear()
        self.nbytes = 0
        return frames

    def put_back(self, rest: bytes | memoryview | list[bytes | memoryview]) -> None:
        """The unsent rest of what `take()` returned: it goes out before anything else."""
        rest = list(rest) if isinstance(rest, list) else [rest]
        if rest:
            self.partial = rest
            self.nbytes += sum(len(r) for r in rest)

    def clear(self) -> None:
        """Drop every queued frame (what the writer already started is kept)."""
        self._items.clear()
        self.nbytes = self._partial_size()

    def _partial_size(self) -> int:
        return sum(len(p) for p in self.partial) if self.partial is not None else 0


# ------------------------------------------------------------------------------ connections
class Outlet:
    """A connection's outgoing side, without I/O: frames queued in an `Outbox`, the decision to
    close, and the too-slow rule (more than `limit_bytes` queued: dropped with 1013).

    It writes nothing. When it gets something new to write (a frame, or the decision to close)
    it enters the shared `ready` list, once, until the shell takes it (`take_ready`) and has
    its writer send; so a broadcast to hundreds of connections costs one append each here.
    """

    __slots__ = ("number", "outbox", "closing", "dropped_slow", "ready", "_in_ready")

    def __init__(
        self, number: int, outbox: Outbox | None = None, *, ready: list[Outlet] | None = None
    ) -> None:
        self.number = number
        self.outbox = outbox if outbox is not None else Outbox()
        self.closing: tuple[int, str] | None = None
        """`(code, reason)` once the server decided to close it; nothing more is queued."""
        self.dropped_slow = False
        self.ready = ready
        self._in_ready = False

    def send(self, frame: Frame, key: object = None, update: bytes | None = None) -> None:
        if self.closing is not None:
            return
        if not self.outbox.push(frame, key, update):
            self.dropped_slow = True
            self.outbox.clear()
            self.close(CLOSE_CODES["too-slow"], "too-slow")
            return
        self._mark_ready()

    def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
            self._mark_ready()

    def _mark_ready(self) -> None:
        if not self._in_ready and self.ready is not None:
            self._in_ready = True
            self.ready.append(self)


def take_ready(ready: list[Outlet]) -> list[Outlet]:
    """The outlets that got something to write since the last call (each once), in order."""
    taken = ready[:]
    ready.clear()
    for outlet in taken:
        outlet._in_ready = False
    return taken


class YConn(Outlet):
    """One y-websocket connection as the rooms see it: an `Outlet`, the room it is in, the
    awareness clients it introduced, and who it was admitted as."""

    __slots__ = (
        "origin",
        "user",
        "device",
        "room",
        "awareness_ids",
        "token_hash",
        "space_id",
        "lease",
    )

    def __init__(
        self,
        number: int,
        outbox: Outbox | None = None,
        *,
        user: str = "",
        device: str = "",
        ready: list[Outlet] | None = None,
    ) -> None:
        super().__init__(number, outbox, ready=ready)
        self.origin = f"yws:{number}"
        self.user = user
        self.device = device
        self.room: Room | None = None
        self.awareness_ids: set[int] | None = None
        """The awareness clients it introduced (None: none yet, the common case)."""
        self.token_hash = ""  # the token it was admitted with (re-checked on accounts changes)
        self.space_id = ""
        self.lease: Lease | None = None  # its device slot, while it is in its room

    def __repr__(self) -> str:
        return f"<YConn {self.number} {self.user}>"

    def deny(self, reason: str, code: int | None = None) -> None:
        """The auth message's permission-denied with `reason`, then a close (data dropped)."""
        if self.closing is not None:
            return
        self.outbox.clear()
        self.outbox.push(self.outbox.framer(permission_denied(reason)))
        self.close(code if code is not None else CLOSE_CODES.get(reason, 4403), reason)


@dataclass(frozen=True, slots=True)
class StoreUpdate:
    """A client's document update for the shell to apply to `HubDocs` (origin `conn.origin`,
    so that it is relayed to everyone but `conn`). Applied before the connection's
    next message, which keeps each client's updates in order; a refusal goes back to the rooms
    with `Rooms.update_refused`."""

    conn: YConn
    space_id: str
    doc_id: str
    update: bytes


# ------------------------------------------------------------------------------------- rooms
class Lease(Protocol):
    def release(self) -> None: ...


class DocsLike(Protocol):
    """What a room reads from `HubDocs` (docs/architecture.md); it never writes to them."""

    def state_vector(self, space_id: str, doc_id: str) -> bytes: ...
    def diff(self, space_id: str, doc_id: str, state_vector: bytes) -> bytes: ...


@dataclass
class Room:
    """One document's connections and awareness states."""

    docs: DocsLike
    space_id: str
    doc_id: str
    framer: Framer = _identity
    conns: dict[int, YConn] = field(default_factory=dict)
    clocks: dict[int, int] = field(default_factory=dict)  # awareness client -> last clock
    states: dict[int, str] = field(default_factory=dict)  # awareness client -> JSON state
    renewed: dict[int, float] = field(default_factory=dict)  # a client's state -> when last set
    relay: list[tuple[bytes, str]] = field(default_factory=list)  # applied, not yet sent
    on_awareness: Callable[[bytes], None] | None = None
    """Told each awareness update the room accepted from its clients (the daemons get it)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.space_id, self.doc_id)

    # -- connections ---------------------------------------------------------------------------
    def join(self, conn: YConn) -> None:
        """Add `conn`; the server speaks first: sync step 1, then the awareness states."""
        conn.room = self
        self.conns[conn.number] = conn
        conn.send(self.framer(sync_step1(self.docs.state_vector(self.space_id, self.doc_id))))
        if self.states:
            conn.send(self.framer(awareness_message(self._all_states())))

    def leave(self, conn: YConn) -> None:
        """Remove `conn` and broadcast the removal of the awareness clients it controlled."""
        if self.conns.pop(conn.number, None) is None:
            return
        conn.room = None
        removed = []
        for client in sorted(conn.awareness_ids or ()):
            self.renewed.pop(client, None)
            if client in self.states:
                del self.states[client]
                clock = self.clocks.get(client, 0) + 1
                self.clocks[client] = clock
                removed.append(AwarenessEntry(client, clock, "null"))
        conn.awareness_ids = None
        if removed:
            payload = encode_awareness(removed)
            self._broadcast(awareness_message(payload), exclude=None)
            self._tell(payload)
        if len(self.clocks) - len(self.states) > MAX_REMOVED_CLOCKS:
            # forget the clocks of long-gone clients (every page reload is a new client id)
            self.clocks = {c: k for c, k in self.clocks.items() if c in self.states}

    # -- incoming ------------------------------------------------------------------------------
    def receive(self, conn: YConn, data: bytes, now: float = 0.0) -> StoreUpdate | None:
        """One websocket message from `conn` at time `now`; a document update comes back as a
        `StoreUpdate` for the shell. Errors close `conn`, never the room."""
        if conn.closing is not None:
            return None
        try:
            msg = decode_message(data)
            if msg.kind == MSG_SYNC:
                if msg.sub == SYNC_STEP1:
                    self._on_step1(conn, msg.payload)
                elif msg.payload != EMPTY_UPDATE:
                    return StoreUpdate(conn, self.space_id, self.doc_id, msg.payload)
            elif msg.kind == MSG_AWARENESS:
                accepted = self._on_awareness(conn, msg.payload, now)
                if accepted:
                    self._tell(encode_awareness(accepted))
            elif msg.kind == MSG_QUERY_AWARENESS:
                conn.send(self.framer(awareness_message(self._all_states())))
            # auth messages from a client and unknown types are ignored, as y-websocket does
        except ClientProtocolError as exc:
            log.info("yws %s: protocol error: %s", conn.number, exc)
            conn.close(CLOSE_CODES["protocol-error"], "protocol-error")
        return None

    def _on_step1(self, conn: YConn, state_vector: bytes) -> None:
        """Answered at once with what the document holds, committed or not (docs/hub.md,
        "Durability": a client that gets data the hub then loses gives it back on its next
        sync, as a relayed update's receivers do)."""
        try:
            update = self.docs.diff(self.space_id, self.doc_id, state_vector)
        except ValueError:
            conn.close(CLOSE_CODES["bad-request"], "bad-state-vector")
            return
        conn.send(self.framer(_sync_head(SYNC_STEP2, update), update))

    def _on_awareness(
        self, conn: YConn | None, payload: bytes, now: float = 0.0
    ) -> list[AwarenessEntry]:
        """Apply an awareness update from `conn` (None: from the daemons, `inject`); relay what
        changed (a higher clock, or the removal of a known state) to the room. The removal of a
        state the room never had is not relayed: each joining client without awareness would
        otherwise cost a message to every client of the room."""
        if self._nothing_new(payload):
            return []
        accepted = []
        for e in decode_awareness(payload):
            if not e.removed and len(e.state) > MAX_STATE:  # presence's cap: not relayed
                log.info("yws room %s/%s: awareness state over %d bytes", *self.key, MAX_STATE)
                continue
            current = self.clocks.get(e.client, 0)
            if current < e.clock or (current == e.clock and e.removed and e.client in self.states):
                self.clocks[e.client] = e.clock
                if e.removed:
                    self.renewed.pop(e.client, None)
                    if conn is not None and conn.awareness_ids:
                        conn.awareness_ids.discard(e.client)
                    if self.states.pop(e.client, None) is None:
                        # nothing to remove (a client that never set a state, as one with
                        # awareness off says on connecting): not relayed, as y-protocols does
                        continue
                else:
                    self.states[e.client] = e.state
                    if conn is not None:  # the daemons time out their own states
                        if conn.awareness_ids is None:
                            conn.awareness_ids = set()
                        conn.awareness_ids.add(e.client)
                        self.renewed[e.client] = now
                accepted.append(e)
        if accepted:
            # To the sender too, as the Node server does: a client alone in a room otherwise
            # hears nothing, and y-websocket providers reconnect after 30 s of silence. Its own
            # entries come back with the clocks it has, so it does not send them again.
            self._broadcast(awareness_message(encode_awareness(accepted)), exclude=None)
        return accepted

    def _nothing_new(self, payload: bytes) -> bool:
        """Whether no entry of this awareness update can change the room (every clock known
        already): the echoes y-websocket clients send of what they applied, N of them for each
        change in a room of N, are dropped without decoding their JSON. Anything else (or
        anything malformed) gets the full decoding."""
        clocks = self.clocks
        try:
            count, pos = lib0_read_var_uint(payload, 0)
            for _ in range(count):
                client, pos = lib0_read_var_uint(payload, pos)
                clock, pos = lib0_read_var_uint(payload, pos)
                n, pos = lib0_read_var_uint(payload, pos)
                current = clocks.get(client, 0)
                if current < clock or (current == clock and client in self.states and n == 4):
                    return False  # newer, or maybe the removal ("null") of a known state
                pos += n
        except BadVarUint:
            return False
        return pos == len(payload)

    def expire(self, now: float) -> float | None:
        """Remove the clients' states not renewed for `AWARENESS_TIMEOUT` (relayed as `null`
        with the clock raised, to the room and the daemons); -> when the next one is due."""
        due = now - AWARENESS_TIMEOUT
        stale = sorted(c for c, at in self.renewed.items() if at <= due)
        removed = []
        for client in stale:
            del self.renewed[client]
            for conn in self.conns.values():
                if conn.awareness_ids:
                    conn.awareness_ids.discard(client)
            if self.states.pop(client, None) is not None:
                clock = self.clocks.get(client, 0) + 1
                self.clocks[client] = clock
                removed.append(AwarenessEntry(client, clock, "null"))
        if removed:
            payload = encode_awareness(removed)
            self._broadcast(awareness_message(payload), exclude=None)
            self._tell(payload)
        return min(self.renewed.values()) + AWARENESS_TIMEOUT if self.renewed else None

    def inject(self, payload: bytes) -> None:
        """Awareness from the daemons on the hub (`Rooms.inject_awareness`): relayed to the
        room's clients; the daemons' side removes its own states when their links close."""
        try:
            self._on_awareness(None, payload)
        except ClientProtocolError as exc:
            log.info("yws room %s/%s: bad awareness from a daemon: %s", *self.key, exc)

    def _tell(self, payload: bytes) -> None:
        if self.on_awareness is not None:
            try:
                self.on_awareness(payload)
            except Exception:
                log.exception("room %s/%s: passing awareness on failed", *self.key)

    def _all_states(self) -> bytes:
        return encode_awareness(
            AwarenessEntry(client, self.clocks.get(client, 0), state)
            for client, state in self.states.items()
        )

    # -- outgoing ------------------------------------------------------------------------------
    def _broadcast(self, message: bytes, exclude: int | None) -> None:
        frame = self.framer(message)  # encoded once; the same bytes go to every recipient
        for number, conn in list(self.conns.items()):
            if number != exclude:
                conn.send(frame)

    def on_update(self, update: bytes, origin: str) -> None:
        """An applied change of this room's document (any origin); sent at `flush()`."""
        self.relay.append((update, origin))

    def flush(self) -> None:
        """Send the applied updates, merged per run of one origin."""
        relay, self.relay = self.relay, []
        i = 0
        while i < len(relay):
            origin = relay[i][1]
            j = i
            while j < len(relay) and relay[j][1] == origin:
                j += 1
            updates = [u for u, _ in relay[i:j]]
            update = updates[0] if len(updates) == 1 else merge_updates(*updates)
            frame = self.framer(_sync_head(SYNC_UPDATE, update), update)
            key = self.key
            for conn in list(self.conns.values()):
                if conn.origin != origin:
                    conn.send(frame, key, update)
            i = j


class Rooms:
    """Every open room, keyed by (space id, doc id); a room lives while it has connections.

    HubDocs feeds it applied updates (`on_update`) and, after each batch, has it send them
    (`flush`, through the `/yjs` endpoint, which then wakes the writers: server.py wires it).
    """

    def __init__(self, docs: DocsLike, framer: Framer = _identity) -> None:
        self.docs = docs
        self.framer = framer
        self.rooms: dict[tuple[str, str], Room] = {}
        self._dirty: set[tuple[str, str]] = set()
        self.awareness_listener: Callable[[str, str, bytes], None] | None = None
        """(space, doc, update): awareness the rooms accepted from their clients (for the
        daemons on the hub: `peers.PeerEndpoint.bridge_rooms`)."""
        self.awareness_provider: Callable[[str, str], bytes | None] | None = None
        """(space, doc) -> the daemons' awareness states, given to a room when it opens."""

    @property
    def clients(self) -> int:
        return sum(len(room.conns) for room in self.rooms.values())

    def connections(self) -> list[YConn]:
        return [conn for room in self.rooms.values() for conn in room.conns.values()]

    def join(self, space_id: str, doc_id: str, conn: YConn) -> Room:
        key = (space_id, doc_id)
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(self.docs, space_id, doc_id, self.framer)
            listener = self.awareness_listener
            if listener is not None:
                room.on_awareness = partial(listener, space_id, doc_id)
            provider = self.awareness_provider
            payload = provider(space_id, doc_id) if provider is not None else None
            if payload:
                room.inject(payload)  # nobody to send it to yet: it becomes the room's states
        room.join(conn)
        return room

    def inject_awareness(self, space_id: str, doc_id: str, payload: bytes) -> None:
        """Awareness from the daemons on the hub, to the room's clients if it is open."""
        room = self.rooms.get((space_id, doc_id))
        if room is not None:
            room.inject(payload)

    def leave(self, conn: YConn) -> None:
        room = conn.room
        if room is None:
            return
        room.leave(conn)
        if not room.conns:
            self.rooms.pop(room.key, None)
            self._dirty.discard(room.key)

    def receive(self, conn: YConn, data: bytes, now: float | None = None) -> StoreUpdate | None:
        """One message from `conn` (at `now`, `time.monotonic()` by default: `expire` must be
        given the same clock); a `StoreUpdate` to apply before its next one, or None."""
        room = conn.room
        if room is None:
            return None
        return room.receive(conn, data, time.monotonic() if now is None else now)

    def expire(self, now: float) -> float | None:
        """Time out the rooms' stale awareness states; -> the next deadline (None: none held)."""
        deadlines = [d for room in list(self.rooms.values()) if (d := room.expire(now)) is not None]
        return min(deadlines) if deadlines else None

    def update_refused(self, event: StoreUpdate, limit: str | None) -> None:
        """The shell could not store `event`: over a limit (`limit` is the reason: the client
        gets permission-denied and its close code), or bytes that are not a Yjs update (None:
        close 4400 bad-update)."""
        conn = event.conn
        if limit is not None:
            conn.deny(limit)
        else:
            conn.close(CLOSE_CODES["bad-update"], "bad-update")

    def on_update(self, space_id: str, doc_id: str, update: bytes, origin: str) -> None:
        """HubDocs listener: an applied update of any document (relayed at once; the store
        commits it alongside)."""
        room = self.rooms.get((space_id, doc_id))
        if room is not None:
            room.on_update(update, origin)
            self._dirty.add(room.key)

    def flush(self) -> None:
        """HubDocs flush listener: after each batch of applied updates."""
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            room = self.rooms.get(key)
            if room is None:
                continue
            try:
                room.flush()
            except Exception:  # one room's failure must not stop the others
                log.exception("room %s/%s: flush failed", *key)
                room.relay.clear()
