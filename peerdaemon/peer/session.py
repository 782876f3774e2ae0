"""One peer connection without I/O: handshake, boxes, the Yjs sync session and keep-alive.

`PeerConnection` is what a transport drives (like h11's `Connection` or aioquic's
`QuicConnection`): feed it each received websocket message with `receive(data, now)`, call
`handle_timer(now)` at `get_timer()`, send what `data_to_send()` returns (telling it with
`sending(now)` / `sent()` while a write is under way), and read what happened from
`next_event()`. It never sleeps or touches a socket, so every rule of the protocol (which
documents, step 1 / step 2 / update, limits, timeouts, a stalled write, close reasons) is tested
in memory with explicit times, and the hub reuses it over its own websocket.

The core never changes a document. A received update becomes an `UpdateReceived` event; the
shell applies it through its `SyncHost` and reports the outcome with `update_applied(event)` or
`update_failed(event, exc)` (`apply_update` does both), and the core decides what follows: an
`error` to the peer for a `DocRefused`, `protocol-error` for bytes that are no update, a
`DocFailed` event for any other failure, `Synced` once the initial step 2s are in. Until the
outcome is reported, later messages wait in arrival order, so updates are applied in the order
received and a step 1 is answered from a state that includes every update received before it.

Read-only queries are still calls: the core reads the host through `SyncHostView`
(`space_keys`, `docs_of`, `allowed`, `state_vector`, `diff`) in the middle of a step, because
answering a step 1 needs the document's state right then, and a query changes nothing a shell
could have to order or undo; an event round trip per query would only add latency.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pycrdt import merge_updates

from ..core.errors import is_failure
from ..model import MODEL_VERSION
from ..model.lib0 import EMPTY_UPDATE
from . import messages
from .handshake import (
    AuthPolicy,
    Established,
    Handshake,
    IdentityLike,
    IncompatibleVersion,
    PeerHello,
    SpaceKeyLike,
    versions_dict,
)
from .messages import (
    CLOSED,
    INCOMPATIBLE_VERSION,
    INTERNAL_ERROR,
    PROTOCOL_ERROR,
    PROTOCOL_VERSION,
    SHUTDOWN,
    SYNC_STEP1,
    SYNC_STEP2,
    SYNC_UPDATE,
    TIMEOUT,
    TOO_LARGE,
    TOO_SLOW,
    UNAUTHORIZED,
    CloseConnection,
    LocalProtocolError,
    PeerProtocolError,
)

__all__ = [
    "EMPTY_STATE_VECTOR",
    "EMPTY_UPDATE",
    "MAX_AWARENESS",
    "AwarenessHost",
    "AwarenessReceived",
    "Closed",
    "DocError",
    "DocFailed",
    "DocRefused",
    "Event",
    "HelloReceived",
    "PeerConnection",
    "QueuedMessage",
    "SessionConfig",
    "SpaceKeyReceived",
    "SyncHostView",
    "SyncSession",
    "Synced",
    "UpdateReceived",
    "UpdateSink",
    "apply_update",
    "is_failure",
]

log = logging.getLogger("peerdaemon.peer")

EMPTY_STATE_VECTOR = b"\x00"
SPACE_DOC_PREFIX = "space:"
"""Doc ids of space documents (section 5): a space's key is handed over after its document."""
BOX_OVERHEAD = 64
"""Upper bound of what boxing adds to an inner message (tag, CBOR map, counter)."""
UPDATE_OVERHEAD = BOX_OVERHEAD + 32
"""Upper bound of what a `sync` update message adds to its doc id and update bytes."""
MAX_AWARENESS = 1 << 20
"""Largest `awareness` message payload handled (docs/peer-protocol.md section 5.1); larger ones
are ignored, the link stays up."""


class SyncHostView(Protocol):
    """`peerdaemon.spaces.SyncHost` as the core sees it: queries only, never a change."""

    def space_keys(self) -> Sequence[SpaceKeyLike]: ...
    def docs_of(self, space_ids: Iterable[str]) -> list[str]: ...
    def allowed(self, doc_id: str, space_ids: Iterable[str]) -> bool: ...
    def state_vector(self, doc_id: str) -> bytes | None: ...
    def diff(self, doc_id: str, state_vector: bytes) -> bytes: ...

    # Optional: `answer_held(doc_id, origin) -> bytes | None`: the whole local state of a
    # document held apart, for the peer whose state is held when it asks for the whole state
    # (section 5.2); None: the ordinary answer (the empty update while held).
    # Optional: `ask(doc) -> bool`, a document whose initial exchange the host decides itself
    # (docs/peer-protocol.md section 5.2); a host without it (the hub) never does.


def _asks(host: SyncHostView, doc: str) -> bool:
    ask = getattr(host, "ask", None)
    return bool(ask(doc)) if ask is not None else False


def _merged(doc: str, *updates: bytes) -> bytes:
    """The peer's updates of one document as one; bytes that are no update are its fault."""
    try:
        return merge_updates(*updates)
    except Exception as exc:
        raise PeerProtocolError(PROTOCOL_ERROR, f"update for {doc} rejected: {exc}") from None


class AwarenessHost(Protocol):
    """Where the shells hand presence (`peerdaemon.presence`, docs/presence.md): `source` names
    one link, so that closing it removes exactly the states it delivered; the host sends through
    its listeners `(doc, payload, exclude, to)`: to the link `to`, or to every link but
    `exclude`."""

    def awareness_opened(self, source: str, docs: Iterable[str]) -> None: ...
    def awareness_received(self, source: str, doc: str, payload: bytes) -> None: ...
    def awareness_closed(self, source: str) -> None: ...
    def add_awareness_listener(
        self, fn: Callable[[str, bytes, str | None, str | None], None]
    ) -> int: ...
    def remove_awareness_listener(self, token: int) -> None: ...


@runtime_checkable
class UpdateSink(Protocol):
    """Where a shell applies the updates the core reports (`SyncHost.apply`): may create the
    document; raises ValueError on bytes that are no update, `DocRefused` for one it will not
    store."""

    def apply(self, doc_id: str, update: bytes, origin: str) -> None: ...

    # Optional: `apply_initial(doc_id, update, origin) -> "push" | "pull" | "hold"` for an
    # `UpdateReceived` with `initial` (section 5.2); without it, `apply` takes it.


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """The limits and timers the sans-I/O core enforces; the defaults are the protocol's
    recommendations. (`PeerConfig` adds what only the trio shell uses.)"""

    max_message: int = 256 << 20
    """Largest websocket message accepted (and sent): a first sync of a big environment is one."""
    ping_interval: float = 15.0
    """Send a ping after this long without receiving anything."""
    idle_timeout: float = 45.0
    """Close with `timeout` after this long without receiving anything."""
    handshake_timeout: float = 10.0
    """Close with `timeout` if the handshake has not completed by then."""
    max_deferred: int = 4096
    """Step 1 requests remembered for documents not (yet) allowed on this connection."""
    coalesce_bytes: int = 8 << 20
    """Past this many bytes queued for a peer, its queued updates are merged, one per document."""
    max_queued: int = 64 << 20
    """Past this many bytes queued for a peer (beyond its largest single message, even after
    merging), the connection is closed with `too-slow`."""
    send_timeout: float = 60.0
    """Close with `too-slow` when writing one message to the peer makes no progress this long."""
    write_batch: int = 1 << 20
    """`data_to_send` hands out about this many bytes at a time (at least one message)."""


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """The peer sent an update of `doc` (a step 2 or an incremental one, never empty): the shell
    applies it through its host with `origin`, then calls `update_applied` or `update_failed`
    (`apply_update` does it all). Later messages wait until then."""

    doc: str
    update: bytes
    origin: str
    """`peer:<device id>`, or the connection's own origin (`hub:<url>` on a connection to a hub)."""
    initial: bool = False
    """The peer's whole state of an ask document at the link's initial exchange (section 5.2):
    the host decides (`UpdateSink.apply_initial`) before our own step 2 goes out."""


@dataclass(frozen=True)
class HelloReceived:
    """The peer's hello arrived: its claims, not yet proven (the manager maps addresses with it)."""

    hello: PeerHello


@dataclass(frozen=True)
class Synced:
    """Every document of the initial exchange got its step 2: this connection has caught up
    once."""

    docs: int


@dataclass(frozen=True)
class DocError:
    """The peer refused our changes of one document (hub mode: a limit); the connection stays
    up."""

    doc: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class DocFailed:
    """Applying the peer's update of one document, or answering its step 1, failed here (a bug,
    content a host cannot handle): that document's error. The connection stays up and the other
    documents keep syncing; reported once per distinct reason, cleared by a later success."""

    doc: str
    reason: str


@dataclass(frozen=True)
class AwarenessReceived:
    """The peer sent an awareness update (`payload`, the y-protocols encoding) of `doc`, one of
    the connection's documents: the shell hands it to its `AwarenessHost`."""

    doc: str
    payload: bytes


@dataclass(frozen=True)
class SpaceKeyReceived:
    """The peer handed us the current key of `space`, one of the connection's common spaces
    (docs/peer-protocol.md 6.1): the shell gives it to its host (`receive_space_key`), which
    takes it only from a member that is not removed, and only if it is newer than its own."""

    space: str
    epoch: int
    secret: bytes = field(repr=False)
    sender: str


@dataclass(frozen=True)
class Closed:
    """The connection is over: `reason` is ours (`by_peer` False) or the peer's close reason."""

    reason: str
    detail: str = ""
    by_peer: bool = False
    versions: dict[str, dict[str, int | None]] | None = None


Event = (
    UpdateReceived
    | HelloReceived
    | Established
    | Synced
    | DocError
    | DocFailed
    | AwarenessReceived
    | SpaceKeyReceived
    | Closed
)


class DocRefused(Exception):
    """Raised by `SyncHost.apply` for an update it will not store (a hub's limits): the peer
    gets a per-document `error` instead of the connection closing, so other documents keep
    syncing."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# -- the sync session ----------------------------------------------------------------------------


class SyncSession:
    """The Yjs sync protocol for every shared document of the common spaces, over one connection.

    Incoming messages for a document are handled only if `host.allowed(doc, spaces)`; a
    document that is not (yet) allowed is ignored, but its step 1 is remembered and answered if
    the document becomes allowed, so a share that arrives a moment later still syncs both ways.
    `receive` returns the update to apply, if any; `update_done` takes its outcome.
    """

    def __init__(
        self,
        host: SyncHostView,
        peer_device: str,
        spaces: frozenset[str],
        send: Callable[[dict[str, Any]], None],
        *,
        max_deferred: int = 4096,
        origin: str | None = None,
        report: Callable[[DocError | DocFailed | AwarenessReceived], None] | None = None,
        send_update: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.host = host
        self.origin = origin or f"peer:{peer_device}"
        self._report = report
        self.refused: dict[str, DocError] = {}
        """Documents the peer refused on this connection: not sent again until the docs change."""
        self.failed: dict[str, str] = {}
        """Documents that failed here on this connection (`DocFailed`), with why: their state."""
        self.spaces = spaces
        self._send = send
        self._send_update = send_update or self._update_message
        self._max_deferred = max_deferred
        self.sent_step1: set[str] = set()
        self._awaiting: set[str] = set()
        self._deferred: dict[str, bytes] = {}
        self._deferred_awareness: dict[str, list[bytes]] = {}
        """Presence of documents not (yet) allowed, the latest few messages of each."""
        self._applying_step2 = False
        """Whether the update handed out by `receive` answers one of our step 1s."""
        self._deciding: dict[str, bytes | None] = {}
        """Ask documents (section 5.2) whose whole state we asked for and not got yet, with the
        peer's updates received meanwhile (merged): part of the state to decide on."""
        self._answer_later: dict[str, bytes] = {}
        """The peer's step 1s of those documents: answered once the host has decided."""
        self._answered: set[str] = set()
        """Documents whose step 1 we answered on this connection."""
        self.synced = False
        self.ignored = 0
        """Messages dropped because their document is not allowed on this connection."""

    MAX_DEFERRED_AWARENESS = 8
    """Presence messages kept per document not (yet) allowed."""

    def open(self) -> None:
        """Send step 1 for every document the common spaces share."""
        for doc in self.host.docs_of(self.spaces):
            self._step1(doc)
        self._awaiting = set(self.sent_step1)
        self._check_synced()

    def set_spaces(self, spaces: frozenset[str]) -> None:
        self.spaces = spaces
        self.docs_changed()

    def docs_changed(self) -> None:
        """The syncable documents changed: step 1 for new ones, answer remembered step 1s."""
        docs = self.host.docs_of(self.spaces)
        for doc in docs:
            if doc not in self.sent_step1:
                self._step1(doc)
        for doc in [d for d in self.refused if d in docs]:
            # A share, unshare or delete may have made room (hub quotas): offer it once more.
            del self.refused[doc]
            try:
                update = self.host.diff(doc, EMPTY_STATE_VECTOR)
            except BaseException as exc:  # our own state: never the peer's fault
                self._doc_failed(doc, "reading the document", exc)
                continue
            if update != EMPTY_UPDATE:
                self._send_update(doc, update)
        for doc, sv in list(self._deferred.items()):
            if self.host.allowed(doc, self.spaces):
                del self._deferred[doc]
                self._on_step1(doc, sv)
        for doc, payloads in list(self._deferred_awareness.items()):
            if self.host.allowed(doc, self.spaces):
                del self._deferred_awareness[doc]
                for payload in payloads:
                    self._awareness(doc, payload)

    def local_update(self, doc: str, update: bytes, origin: str) -> None:
        """A change of a local document: forward it unless it came from this very peer."""
        if origin == self.origin or doc in self.refused:
            return
        if not self.host.allowed(doc, self.spaces):
            return
        if doc in self._deciding and doc not in self._answered:
            return  # our step 2, once the host has decided, carries it (section 5.2)
        self._send_update(doc, update)

    def _update_message(self, doc: str, update: bytes) -> None:
        self._send({"t": "sync", "doc": doc, "m": messages.encode_sync(SYNC_UPDATE, update)})

    def receive(self, msg: dict[str, Any]) -> UpdateReceived | None:
        """One message of the session; -> the update the shell must apply, if it carries one
        (its outcome goes to `update_done` before the next message)."""
        t = msg["t"]
        if t == "awareness":
            self._awareness(msg["doc"], msg["m"])
            return None
        if t == "error":
            error = DocError(msg["doc"], msg["reason"], msg.get("detail", ""))
            self.refused[error.doc] = error
            if self._report is not None:
                self._report(error)
            return None
        if t != "sync":
            raise PeerProtocolError(PROTOCOL_ERROR, f"unexpected {t!r} in the sync session")
        doc = msg["doc"]
        kind, payload = messages.decode_sync(msg["m"])
        if not self.host.allowed(doc, self.spaces):
            self.ignored += 1
            if kind == SYNC_STEP1 and (
                doc in self._deferred or len(self._deferred) < self._max_deferred
            ):
                self._deferred[doc] = payload
            log.debug("ignoring sync for %s: not allowed on the connection to %s", doc, self.origin)
            return None
        if kind == SYNC_STEP1:
            self._on_step1(doc, payload)
            return None
        if doc in self._deciding:
            return self._deciding_received(doc, kind, payload)
        if payload == EMPTY_UPDATE:
            if kind == SYNC_STEP2:
                self._step2_received(doc)
            return None
        self._applying_step2 = kind == SYNC_STEP2
        return UpdateReceived(doc, payload, self.origin)

    def _on_step1(self, doc: str, state_vector: bytes) -> None:
        """Answer a step 1, then send ours if not sent yet. An ask document's answer waits for
        the host's decision (section 5.2) unless the peer asked for our whole state (the empty
        state vector: a peer that decides itself, or one that holds nothing)."""
        if (
            state_vector != EMPTY_STATE_VECTOR
            and doc not in self._answered
            and _asks(self.host, doc)
        ):
            if doc not in self.sent_step1:
                self._step1(doc)
            if doc in self._deciding:
                self._answer_later[doc] = state_vector
                return
        self._answer_step1(doc, state_vector)
        if doc not in self.sent_step1:
            self._step1(doc)

    def _deciding_received(self, doc: str, kind: int, payload: bytes) -> UpdateReceived | None:
        """A message of an ask document awaiting the peer's whole state: an update joins what
        the host will decide on; the step 2 completes it and goes to the host as `initial`."""
        early = self._deciding[doc]
        if kind != SYNC_STEP2:
            if payload != EMPTY_UPDATE:
                self._deciding[doc] = payload if early is None else _merged(doc, early, payload)
            return None
        del self._deciding[doc]
        parts = [p for p in (payload, early) if p is not None and p != EMPTY_UPDATE]
        if not parts:  # the peer holds nothing of it: ours goes out as the plain answer
            self._step2_received(doc)
            self._decided(doc)
            return None
        update = parts[0] if len(parts) == 1 else _merged(doc, *parts)
        self._applying_step2 = True
        return UpdateReceived(doc, update, self.origin, initial=True)

    def _decided(self, doc: str) -> None:
        state_vector = self._answer_later.pop(doc, None)
        if state_vector is not None:
            self._answer_step1(doc, state_vector)

    def _awareness(self, doc: str, payload: bytes) -> None:
        """Presence of one of the connection's documents: an event for the shell. Presence is
        advisory, so what is not ours to read (another document, an oversized payload) is
        dropped and the link stays up."""
        if len(payload) > MAX_AWARENESS:
            self.ignored += 1
            log.debug("ignoring awareness for %s on the connection to %s", doc, self.origin)
            return
        if not self.host.allowed(doc, self.spaces):
            # kept (as a step 1 is) for a document shared a moment later: its presence would
            # otherwise wait for the sender's next renewal
            deferred = self._deferred_awareness.get(doc)
            if deferred is not None:
                deferred.append(payload)
                del deferred[: -self.MAX_DEFERRED_AWARENESS]
            elif len(self._deferred_awareness) < self._max_deferred:
                self._deferred_awareness[doc] = [payload]
            else:
                self.ignored += 1
            return
        if self._report is not None:
            self._report(AwarenessReceived(doc, payload))

    def update_done(self, event: UpdateReceived, exc: BaseException | None) -> None:
        """The shell applied `event` (`exc` None) or its host raised `exc`: a refusal becomes an
        `error` to the peer, bytes that are no update the peer's fault (`protocol-error`), any
        other failure this document's error here (`DocFailed`), never the connection's."""
        doc = event.doc
        step2, self._applying_step2 = self._applying_step2, False
        if exc is None:
            if self.failed:
                self.failed.pop(doc, None)
        elif isinstance(exc, DocRefused):
            error = {"t": "error", "doc": doc, "reason": exc.reason[: messages.MAX_REASON]}
            if exc.detail:
                error["detail"] = exc.detail[: messages.MAX_DETAIL]
            self._send(error)
        elif isinstance(exc, ValueError):  # not a Yjs update: the peer's fault
            raise PeerProtocolError(PROTOCOL_ERROR, f"update for {doc} rejected: {exc}")
        else:
            self._doc_failed(doc, "applying the peer's update", exc)
        if step2:
            self._step2_received(doc)
        if event.initial:
            self._decided(doc)

    def _step2_received(self, doc: str) -> None:
        if doc in self._awaiting:
            self._awaiting.discard(doc)
            self._check_synced()

    def _step1(self, doc: str) -> None:
        if _asks(self.host, doc):
            # ask for the peer's whole state: the host compares it with its own (section 5.2)
            sv: bytes | None = EMPTY_STATE_VECTOR
            self._deciding[doc] = None
        else:
            sv = self.host.state_vector(doc)
        self.sent_step1.add(doc)
        m = messages.encode_sync(SYNC_STEP1, EMPTY_STATE_VECTOR if sv is None else sv)
        self._send({"t": "sync", "doc": doc, "m": m})

    def _answer_step1(self, doc: str, state_vector: bytes) -> None:
        self._answered.add(doc)
        if self.host.state_vector(doc) is None:
            update = EMPTY_UPDATE
        else:
            try:
                update = self._whole_for_holder(doc, state_vector)
                if update is None:
                    update = self.host.diff(doc, state_vector)
            except ValueError as exc:
                raise PeerProtocolError(
                    PROTOCOL_ERROR, f"bad state vector for {doc}: {exc}"
                ) from None
            except BaseException as exc:
                # Not answered: the peer keeps waiting for this document (it is not in step),
                # while every other document syncs.
                self._doc_failed(doc, "answering the peer's step 1", exc)
                return
        self._send({"t": "sync", "doc": doc, "m": messages.encode_sync(SYNC_STEP2, update)})

    def _whole_for_holder(self, doc: str, state_vector: bytes) -> bytes | None:
        """The host's whole state of a document it holds apart, for the peer whose state it
        holds when that peer asks for the whole state (section 5.2, "While held"), else None."""
        if state_vector != EMPTY_STATE_VECTOR:
            return None
        answer = getattr(self.host, "answer_held", None)
        return answer(doc, self.origin) if answer is not None else None

    def _check_synced(self) -> None:
        if not self._awaiting and not self.synced:
            self.synced = True

    def _doc_failed(self, doc: str, step: str, exc: BaseException) -> None:
        """One document failed here: its error (logged, a `DocFailed` event), not the
        connection's. Only cancellations and interrupts go on: pycrdt's Rust panics are failures
        too."""
        if not is_failure(exc):
            raise exc
        reason = f"{step} failed: {type(exc).__name__}: {exc}"
        if self.failed.get(doc) == reason:
            return
        self.failed[doc] = reason
        log.error("%s on the connection to %s: %s", doc, self.origin, reason, exc_info=exc)
        if self._report is not None:
            self._report(DocFailed(doc, reason))


# -- the outgoing queue --------------------------------------------------------------------------


class QueuedMessage:
    """One queued outgoing message: wire bytes, an inner message to box, or the update(s) of one
    document to send as a single `sync` update (`parts`, merged when it is sent). Boxing waits
    until the shell takes the message, so queued updates can still be merged."""

    __slots__ = ("base", "doc", "extra", "msg", "parts", "size", "wire")

    def __init__(
        self,
        *,
        wire: bytes | None = None,
        msg: dict[str, Any] | None = None,
        doc: str | None = None,
        update: bytes | None = None,
        size: int = 0,
    ) -> None:
        self.wire = wire
        self.msg = msg
        self.doc = doc
        self.parts: list[bytes] | None = [update] if update is not None else None
        self.extra = size - (len(update) if update is not None else 0)
        self.size = size
        self.base = size
        """The largest single message this one is made of (merged updates count one by one)."""

    def resize(self) -> int:
        """Recompute `size` after `parts` changed; -> the change."""
        assert self.parts is not None
        size = self.extra + sum(len(p) for p in self.parts)
        delta, self.size = size - self.size, size
        return delta


# -- the connection ------------------------------------------------------------------------------


class PeerConnection:
    """Everything one side of one peer connection decides, given messages and the time.

    `host` is only read (`SyncHostView`); received updates come out as `UpdateReceived` events
    for the shell to apply (module docstring). `config` is the core's own part of the settings.
    """

    def __init__(
        self,
        identity: IdentityLike,
        host: SyncHostView,
        *,
        dialer: bool,
        now: float,
        config: SessionConfig | None = None,
        model: int = MODEL_VERSION,
        accepted_models: Iterable[int] | None = None,
        random: Callable[[int], bytes] = os.urandom,
        auth: AuthPolicy | None = None,
        origin: str | None = None,
    ) -> None:
        self.identity = identity
        self.host = host
        self.dialer = dialer
        self.origin = origin
        """The origin of the peer's updates (default `peer:<device id>`; a hub's: `hub:<url>`)."""
        self.config = config or SessionConfig()
        self.model = model
        self.handshake = Handshake(
            identity,
            host.space_keys,
            dialer=dialer,
            model=model,
            accepted_models=accepted_models,
            random=random,
            auth=auth,
            refuse=getattr(host, "refuse_peer", None),
        )
        self.session: SyncSession | None = None
        self.closed: Closed | None = None
        self.hello: PeerHello | None = None
        self.claimed_device: str | None = None
        self.claimed_name: str | None = None
        """What the peer's hello or cleartext close says, even when we could not accept it."""
        self.established: Established | None = None
        self._out: deque[QueuedMessage] = deque()
        self._updates: dict[str, QueuedMessage] = {}
        """Per document, the queued update message later updates of it are merged into."""
        self.queued_bytes = 0
        """Bytes waiting in `_out` (what `data_to_send` has not handed out yet)."""
        self.coalesced = 0
        """Updates merged into an already queued update message instead of queued on their own."""
        self._events: deque[Event] = deque()
        self._applying: UpdateReceived | None = None
        """The update handed to the shell whose outcome is not reported yet."""
        self._held: deque[bytes | str] = deque()
        """Messages received meanwhile: handled, in order, once that outcome is in."""
        self._write_since: float | None = None
        """While the shell is writing: when the write last made progress (`send_timeout`)."""
        self._cleartext_ok = True  # until the peer's first box
        self._handshake_deadline = now + self.config.handshake_timeout
        self._last_received = now
        self._next_ping = now + self.config.ping_interval
        self._announced: frozenset[bytes] = frozenset()
        self._synced_reported = False
        self._space_docs_asked: set[str] = set()
        """Space documents the peer sent its step 1 of: it has our step 2 (removals) first."""
        self._keys_sent: set[tuple[str, int]] = set()
        self._queue_wire(self.handshake.start())

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """ "handshake", "open" or "closed"."""
        if self.closed is not None:
            return "closed"
        return "open" if self.session is not None else "handshake"

    @property
    def spaces(self) -> frozenset[str]:
        return self.session.spaces if self.session is not None else frozenset()

    @property
    def peer_device(self) -> str | None:
        """The device id from the peer's hello (proven only once `established` is set)."""
        return self.hello.device if self.hello is not None else self.claimed_device

    @property
    def peer_name(self) -> str | None:
        return self.hello.name if self.hello is not None else self.claimed_name

    # -- outputs -------------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Websocket binary messages to send, in order: about `write_batch` bytes (at least one
        message), so call it again until it returns nothing. After a close, send them, then hang
        up. Messages are boxed here, so queued updates can still be merged until then."""
        out: list[bytes] = []
        budget = self.config.write_batch
        while self._out and budget > 0:
            entry = self._out.popleft()
            self.queued_bytes -= entry.size
            data = self._wire(entry)
            out.append(data)
            budget -= len(data)
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def wants_write(self) -> bool:
        """Whether the shell's writer has work: messages queued, or a closed connection to
        hang up."""
        return bool(self._out) or self.closed is not None

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called (None once closed)."""
        if self.closed is not None:
            return None
        if self.session is None:
            deadline = self._handshake_deadline
        else:
            deadline = min(self._next_ping, self._last_received + self.config.idle_timeout)
        if self._write_since is not None:
            deadline = min(deadline, self._write_since + self.config.send_timeout)
        return deadline

    @property
    def awaiting_outcome(self) -> UpdateReceived | None:
        """The `UpdateReceived` whose outcome the shell has not reported yet (messages wait)."""
        return self._applying

    # -- inputs --------------------------------------------------------------------------------

    def receive(self, data: bytes | str, now: float) -> None:
        """One websocket message from the peer. Anything wrong closes the connection; while an
        update awaits its outcome (`UpdateReceived`), the message waits its turn."""
        if self.closed is not None:
            return
        self._last_received = now
        self._next_ping = now + self.config.ping_interval
        if self._applying is not None:
            self._held.append(data)
            return
        self._receive_one(data)

    def update_applied(self, event: UpdateReceived) -> None:
        """The shell applied `event` through its host."""
        self._settle(event, None)

    def update_failed(self, event: UpdateReceived, exc: BaseException) -> None:
        """The shell's host raised `exc` applying `event`: `DocRefused` is answered with an
        `error`, a ValueError (no Yjs update) closes with `protocol-error`, anything else is that
        document's `DocFailed` and the connection goes on."""
        self._settle(event, exc)

    def sending(self, now: float) -> None:
        """The shell is writing what `data_to_send` handed out: it started, or finished one
        message, at `now`. A write that makes no progress for `send_timeout` is `too-slow`."""
        self._write_since = now

    def sent(self) -> None:
        """The shell has written everything it took: no write to watch any more."""
        self._write_since = None

    def handle_timer(self, now: float) -> None:
        if self.closed is not None:
            return
        since = self._write_since
        if since is not None and now >= since + self.config.send_timeout:
            self._close(TOO_SLOW, f"no progress writing to the peer for {now - since:.1f} s")
            return
        if self.session is None:
            if now >= self._handshake_deadline:
                self._close(TIMEOUT, "handshake did not complete in time")
            return
        if now >= self._last_received + self.config.idle_timeout:
            self._close(TIMEOUT, f"nothing received for {now - self._last_received:.1f} s")
        elif now >= self._next_ping:
            self._guard(self._send_inner, {"t": "ping"})
            self._next_ping = now + self.config.ping_interval

    def local_update(self, doc: str, update: bytes, origin: str) -> None:
        """A local document changed (`SyncHost.add_listener`)."""
        if self.session is not None and self.closed is None:
            self._guard(self.session.local_update, doc, update, origin)

    def send_awareness(self, doc: str, payload: bytes) -> bool:
        """Queue an awareness update of `doc` (docs/presence.md) if the connection is open and
        syncs `doc`; -> whether it was queued."""
        session = self.session
        if session is None or self.closed is not None or len(payload) > MAX_AWARENESS:
            return False
        if not session.host.allowed(doc, session.spaces):
            return False
        self._guard(self._send_inner, {"t": "awareness", "doc": doc, "m": payload})
        return True

    def docs_changed(self) -> None:
        """The syncable documents or our spaces changed (`SyncHost.add_docs_listener`)."""
        if self.session is None or self.closed is not None:
            return
        self._guard(self._refresh_spaces)

    def close(self, reason: str = SHUTDOWN, detail: str = "") -> None:
        """Close from our side (shutdown, duplicate connection...): queues the close message."""
        if self.closed is None:
            self._close(reason, detail)

    def connection_lost(self, reason: str = CLOSED, detail: str = "") -> None:
        """The transport ended without a close message (or after ours)."""
        if self.closed is None:
            self._finish(Closed(reason, detail, by_peer=True))

    # -- internals -----------------------------------------------------------------------------

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            self._fail(exc)

    def _receive_one(self, data: bytes | str) -> None:
        try:
            self._receive(data)
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """An error while handling input closes this connection only (a protocol error with its
        reason, a bug or a host failure as `internal-error`); cancellations go on."""
        if isinstance(exc, CloseConnection):
            versions = exc.versions if isinstance(exc, IncompatibleVersion) else None
            self._close(exc.reason, exc.detail, versions=versions)
            return
        if not is_failure(exc):
            raise exc
        log.error("peer connection failed", exc_info=exc)
        self._close(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    def _settle(self, event: UpdateReceived, exc: BaseException | None) -> None:
        """The outcome of the update being applied: act on it, then on the messages held."""
        if event is not self._applying:
            raise RuntimeError(f"{event!r} is not the update awaiting its outcome")
        self._applying = None
        session = self.session
        if self.closed is None and session is not None:
            try:
                session.update_done(event, exc)
            except BaseException as error:
                self._fail(error)
            if session.synced and not self._synced_reported:
                self._report_synced()
        while self._held and self._applying is None and self.closed is None:
            self._receive_one(self._held.popleft())
        if self.closed is not None:
            self._held.clear()

    def _receive(self, data: bytes | str) -> None:
        outer = messages.decode(data, self.config.max_message)
        messages.validate_cleartext(outer)
        t = outer["t"]
        if t == "box":
            channel = self.handshake.channel
            if channel is None:
                raise PeerProtocolError(PROTOCOL_ERROR, "box before the hellos were exchanged")
            inner = channel.open(outer, self.config.max_message)
            self._cleartext_ok = False
            self._receive_inner(inner)
            return
        if not self._cleartext_ok:
            raise PeerProtocolError(PROTOCOL_ERROR, f"cleartext {t!r} after encryption started")
        self._note_claims(outer)
        if t == "close":
            self._peer_closed(outer)
            return
        assert t == "hello"
        try:
            out = self.handshake.receive_hello(outer, bytes(data))
        finally:
            if self.handshake.peer is not None and self.hello is None:
                self.hello = self.handshake.peer
                self._events.append(HelloReceived(self.hello))
        self._queue_wire(out)

    def _note_claims(self, msg: dict[str, Any]) -> None:
        device, name = msg.get("device"), msg.get("name")
        if isinstance(device, str) and 0 < len(device) <= messages.MAX_DEVICE_ID:
            self.claimed_device = device
            self.claimed_name = name[: messages.MAX_NAME] if isinstance(name, str) else None

    def _receive_inner(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "close":
            self._peer_closed(msg)
        elif self.session is None:
            if t != "auth":
                raise PeerProtocolError(PROTOCOL_ERROR, f"{t!r} before authentication")
            self._queue_wire(self.handshake.receive_auth(msg))
            self._open(self.handshake.result)
        elif t == "ping":
            self._send_inner({"t": "pong"})
        elif t == "pong":
            pass
        elif t == "spaces":
            self.handshake.peer_tags = list(msg["tags"])
            self._refresh_spaces(announce=False)
        elif t == "space-key":
            self._space_key(msg)
        elif t == "auth":
            raise PeerProtocolError(PROTOCOL_ERROR, "second auth")
        else:
            asked = t == "sync" and msg["doc"].startswith(SPACE_DOC_PREFIX)
            if asked and msg["m"][:1] == b"\0":  # a step 1 of a space document
                self._space_docs_asked.add(msg["doc"])
            update = self.session.receive(msg)
            if update is not None:
                self._applying = update
                self._events.append(update)
            else:
                self._report_synced()
            if asked:
                self._offer_keys()

    # -- key epochs (docs/peer-protocol.md 6.1) --------------------------------------------------

    def _offer_keys(self) -> None:
        """Hand our current key of each common space to a peer that proved only an older one
        (its device is a member: `refuse` admitted it), once it has asked for the space
        document, so that our step 2 (with any removal) reaches it before the key does."""
        session = self.session
        if session is None or self.handshake.auth is not None:
            return
        if not self.handshake.peer_takes_keys:
            return
        current: dict[str, Any] = {}
        for key in self.host.space_keys():
            current.setdefault(key.id, key)  # the current key comes first
        for space in session.spaces:
            key = current.get(space)
            epoch = getattr(key, "epoch", 0)
            if key is None or self.handshake.proven.get(space, epoch) >= epoch:
                continue
            if (space, epoch) in self._keys_sent:
                continue
            if SPACE_DOC_PREFIX + space not in self._space_docs_asked:
                continue
            self._keys_sent.add((space, epoch))
            msg = {"t": "space-key", "space": space, "epoch": epoch, "secret": key.secret}
            self._send_inner(msg)

    def _space_key(self, msg: dict[str, Any]) -> None:
        """A `space-key`: for the host to judge, if the space is one the connection syncs (a
        hub holds no space secrets and never sends one; anything else is ignored)."""
        if self.handshake.auth is not None or self.session is None:
            return
        if msg["space"] not in self.session.spaces or self.established is None:
            return
        self._events.append(
            SpaceKeyReceived(msg["space"], msg["epoch"], msg["secret"], self.established.device)
        )

    def _open(self, result: Established | None) -> None:
        assert result is not None
        self.established = result
        self._announced = frozenset(self.handshake.own_tags())
        self.session = SyncSession(
            self.host,
            result.device,
            result.spaces,
            self._send_inner,
            max_deferred=self.config.max_deferred,
            origin=self.origin,
            report=self._events.append,
            send_update=self._send_update,
        )
        self._events.append(result)
        self.session.open()
        self._report_synced()
        self._offer_keys()

    def _refresh_spaces(self, announce: bool = True) -> None:
        """Recompute the common spaces after our spaces or the peer's announcement changed."""
        assert self.session is not None
        if announce:
            tags = self.handshake.own_tags()
            if frozenset(tags) != self._announced:
                self._announced = frozenset(tags)
                self._send_inner({"t": "spaces", "tags": tags})
        spaces = self.handshake.common_spaces()
        if not spaces:
            # after the peer's announcement, its doing; after a change of ours, ours
            fault = LocalProtocolError if announce else PeerProtocolError
            raise fault(self.handshake.refusal or UNAUTHORIZED, "no common space any more")
        if spaces != self.session.spaces:
            self.session.set_spaces(spaces)
        else:
            self.session.docs_changed()
        self._report_synced()
        self._offer_keys()

    def _report_synced(self) -> None:
        if self.session is not None and self.session.synced and not self._synced_reported:
            self._synced_reported = True
            self._events.append(Synced(len(self.session.sent_step1)))

    def _send_inner(self, msg: dict[str, Any]) -> None:
        assert self.handshake.channel is not None
        if self.closed is not None:
            return
        size = len(messages.encode(msg)) + BOX_OVERHEAD
        if size > self.config.max_message:
            raise LocalProtocolError(TOO_LARGE, f"outgoing message of {size} bytes")
        self._push(QueuedMessage(msg=msg, size=size))

    def _send_update(self, doc: str, update: bytes) -> None:
        """A `sync` update of `doc`: merged into the one already queued for `doc` if any."""
        if self.closed is not None:
            return
        size = len(update) + len(doc.encode()) + UPDATE_OVERHEAD
        if size > self.config.max_message:
            raise LocalProtocolError(TOO_LARGE, f"outgoing message of {size} bytes")
        head = self._updates.get(doc)
        if head is not None and head.size + len(update) <= self.config.max_message:
            assert head.parts is not None
            head.parts.append(update)
            self.queued_bytes += len(update)
            head.size += len(update)
            head.base = max(head.base, head.extra + len(update))
            self.coalesced += 1
            self._merge_tail(head)
            self._check_queue()
            return
        self._push(QueuedMessage(doc=doc, update=update, size=size))

    # -- the outgoing queue --------------------------------------------------------------------

    def _queue_wire(self, data: Iterable[bytes]) -> None:
        for wire in data:
            self._out.append(QueuedMessage(wire=wire, size=len(wire)))
            self.queued_bytes += len(wire)

    def _push(self, entry: QueuedMessage) -> None:
        self._out.append(entry)
        self.queued_bytes += entry.size
        self._check_queue()

    def _check_queue(self) -> None:
        """Past `coalesce_bytes` merge queued updates per document; past `max_queued` (beyond
        the largest single message queued, which `max_message` bounds anyway: the first sync of
        a large document is one message) the peer is not keeping up: `too-slow`."""
        if self.queued_bytes <= self.config.coalesce_bytes:
            return
        self._coalesce()
        if self.queued_bytes > self.config.max_queued:
            largest = max(entry.base for entry in self._out)
            if self.queued_bytes - largest > self.config.max_queued:
                raise PeerProtocolError(
                    TOO_SLOW, f"{self.queued_bytes} bytes queued: the peer does not keep up"
                )

    def _coalesce(self) -> None:
        """Fold every queued update message into the first queued one of its document."""
        limit = self.config.max_message
        folded = False
        for entry in self._out:
            if entry.parts is None:
                continue
            assert entry.doc is not None
            head = self._updates.get(entry.doc)
            if head is entry:
                continue
            if head is None or head.size + entry.size - entry.extra > limit:
                self._updates[entry.doc] = entry
                continue
            assert head.parts is not None
            head.parts.extend(entry.parts)
            head.size += entry.size - entry.extra
            head.base = max(head.base, entry.base)
            self.queued_bytes -= entry.extra
            self.coalesced += len(entry.parts)
            entry.parts = None
            entry.size = -1  # dropped below
            folded = True
        if folded:
            self._out = deque(entry for entry in self._out if entry.size >= 0)
        for head in self._updates.values():
            assert head.parts is not None
            if len(head.parts) > 1:
                head.parts = [merge_updates(*head.parts)]
                self.queued_bytes += head.resize()

    def _merge_tail(self, head: QueuedMessage) -> None:
        """Merge the newest parts while they are not much smaller than the ones before them:
        each update gets merged O(log n) times, however many are queued."""
        parts = head.parts
        assert parts is not None
        merged = False
        while len(parts) > 1 and len(parts[-2]) <= 2 * len(parts[-1]):
            parts[-2:] = [merge_updates(parts[-2], parts[-1])]
            merged = True
        if merged:
            self.queued_bytes += head.resize()

    def _wire(self, entry: QueuedMessage) -> bytes:
        if entry.wire is not None:
            return entry.wire
        channel = self.handshake.channel
        assert channel is not None
        if entry.parts is not None:
            assert entry.doc is not None
            if self._updates.get(entry.doc) is entry:
                del self._updates[entry.doc]
            parts = entry.parts
            update = parts[0] if len(parts) == 1 else merge_updates(*parts)
            m = messages.encode_sync(SYNC_UPDATE, update)
            return channel.seal({"t": "sync", "doc": entry.doc, "m": m})
        assert entry.msg is not None
        return channel.seal(entry.msg)

    def _drop_queue(self) -> None:
        self._out.clear()
        self._updates.clear()
        self.queued_bytes = 0

    def _peer_closed(self, msg: dict[str, Any]) -> None:
        reason = msg["reason"]
        versions = None
        if reason == INCOMPATIBLE_VERSION:
            versions = versions_dict((PROTOCOL_VERSION, self.model), messages.versions_of(msg))
        elif reason == SHUTDOWN:
            reason = CLOSED
        elif reason not in messages.REASONS:
            reason = CLOSED
        self._finish(Closed(reason, msg.get("detail", ""), by_peer=True, versions=versions))

    def _close(
        self, reason: str, detail: str = "", *, versions: dict[str, Any] | None = None
    ) -> None:
        msg: dict[str, Any] = {"t": "close", "reason": reason}
        if detail:
            msg["detail"] = detail[: messages.MAX_DETAIL]
        if reason == TOO_SLOW:
            self._drop_queue()  # the peer would not read it; reconnecting resyncs everything
        channel = self.handshake.channel
        if channel is not None:
            size = len(messages.encode(msg)) + BOX_OVERHEAD
            self._out.append(QueuedMessage(msg=msg, size=size))
            self.queued_bytes += size
        else:
            msg["proto"], msg["model"] = PROTOCOL_VERSION, self.model
            msg["device"] = self.identity.device_id
            msg["name"] = self.identity.name[: messages.MAX_NAME]
            self._queue_wire([messages.encode(msg)])
        self._finish(Closed(reason, detail, by_peer=False, versions=versions))

    def _finish(self, closed: Closed) -> None:
        self.closed = closed
        self._held.clear()
        self._events.append(closed)


# -- what every shell does with an UpdateReceived ------------------------------------------------


def apply_update(conn: PeerConnection, event: UpdateReceived, sink: UpdateSink) -> None:
    """Apply `event` through `sink` (the shell's `SyncHost`) and report the outcome to `conn`,
    which decides what the peer is told. Called by the shell, never by the core: this is where
    a received update reaches the registry, the store and the other connections. Cancellations
    and interrupts go on (the connection is being torn down anyway)."""
    initial = getattr(sink, "apply_initial", None) if event.initial else None
    try:
        if initial is not None:
            initial(event.doc, event.update, event.origin)
        else:
            sink.apply(event.doc, event.update, event.origin)
    except BaseException as exc:
        if not is_failure(exc):
            raise
        conn.update_failed(event, exc)
    else:
        conn.update_applied(event)
