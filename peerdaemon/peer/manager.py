"""The peer manager: the listener, the dials, one connection per device, the peers table.

Every address to dial (from `--peer`, invites or discovery) gets its own dial loop: dial, run the
link until it ends, wait (exponential backoff with jitter, reset by a completed sync), dial
again; a loop whose device is already connected waits instead. When two connections to one
device are established (both dialed at once), both sides keep the one dialed by the smaller
device id and close the other with `duplicate`, so they agree without talking about it.

All bookkeeping happens synchronously in `_on_event`, on the trio thread, so the table, the
fan-out of local changes and the tie-break never see a half-updated state. Received updates never
reach the manager: each `Link` applies them through the host (the manager's `SyncHost`), whose
listeners fan them out to the other links (`_on_local_change`).

Only authenticated facts change a device's row. A hello is a claim anyone can make (a device id
and its public key are no secret), so until the handshake proves the key (`Established`), a
dialed connection counts for the address we dialed (its row: the device we expect there, or the
address), and an incoming one for no row at all; the names hellos carry are never shown.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..core.backoff import Backoff
from ..core.wsstream import WebSocket
from ..model import MODEL_VERSION
from .config import PeerConfig
from .handshake import Established, IdentityLike, PeerHello
from .link import Link, Slot, Unreachable, dial, format_address, remote_address, serve
from .messages import CLOSED, DUPLICATE, SELF
from .session import (
    AwarenessHost,
    AwarenessReceived,
    Closed,
    DocFailed,
    Event,
    HelloReceived,
    PeerConnection,
    SpaceKeyReceived,
    Synced,
    SyncHostView,
    UpdateSink,
)

__all__ = ["PeerManager"]

log = logging.getLogger("peerdaemon.peer")


class ManagedHost(SyncHostView, UpdateSink, Protocol):
    """The SyncHost contract (docs/architecture.md) as the manager uses it: what its links read
    and apply, and the listeners that fan local changes out to them."""

    def add_listener(self, fn: Callable[[str, bytes, str], None]) -> int: ...
    def remove_listener(self, token: int) -> None: ...
    def add_docs_listener(self, fn: Callable[[], None]) -> int: ...


CONNECTED = "connected"
CONNECTING = "connecting"
DISCONNECTED = "disconnected"


@dataclass(eq=False)
class _Target:
    """An address we dial, and what we know of the device behind it."""

    host: str
    port: int
    device: str | None
    source: str
    backoff: Backoff
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None
    is_self: bool = False
    dialing: bool = False
    removed: bool = False

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass(eq=False)
class _Row:
    """One line of `peerdaemon peers`: a device (or, until we reach it, a dialed address)."""

    device: str | None
    name: str | None = None
    address: str | None = None
    reason: str | None = None
    since: float = field(default_factory=time.time)
    versions: dict[str, Any] | None = None
    links: list[Link] = field(default_factory=list)  # established, oldest first
    pending: set[Any] = field(default_factory=set)  # links (and targets) still connecting
    state: str = DISCONNECTED
    emitted: tuple[str, str | None] | None = None
    synced: bool = False


class PeerManager:
    """The daemon's peer service. `run` is started with `nursery.start` (returns the bound port)."""

    def __init__(
        self,
        identity: IdentityLike,
        host: ManagedHost,
        emit_event: Callable[..., Any],
        *,
        listen: tuple[str, int] | None = None,
        static_peers: list[tuple[str, int]] | None = None,
        config: PeerConfig | None = None,
        model: int = MODEL_VERSION,
        rng: random.Random | None = None,
        awareness: AwarenessHost | None = None,
    ) -> None:
        self.identity = identity
        self.awareness = awareness
        """Presence (docs/presence.md): what the links receive goes there, and its updates out."""
        self.host = host
        self.emit_event = emit_event
        self.listen = listen
        self.config = config or PeerConfig()
        self.model = model
        self.port: int | None = None
        self._rng = rng or random.Random()
        self._targets: dict[tuple[str, int], _Target] = {}
        self._rows: dict[str, _Row] = {}
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._space_secrets: frozenset[bytes] = frozenset()
        for h, p in static_peers or ():
            self.add_address(h, p, source="static")

    # -- public API ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen (if configured) and dial every known address until cancelled."""
        host = self.host
        self._space_secrets = self._secrets()
        change_token = host.add_listener(self._on_local_change)
        docs_token = host.add_docs_listener(self._on_docs_changed)
        awareness = self.awareness
        awareness_token = (
            awareness.add_awareness_listener(self._on_awareness) if awareness else None
        )
        try:
            async with trio.open_nursery() as nursery:
                if self.listen is not None:
                    self.port = await nursery.start(
                        serve, self.listen[0], self.listen[1], self._serve_inbound, self.config
                    )
                    log.info("peers: listening on %s", format_address(self.listen[0], self.port))
                self._nursery = nursery
                for target in self._targets.values():
                    nursery.start_soon(self._dial_loop, target)
                task_status.started(self.port)
                await trio.sleep_forever()  # dial loops start later, from add_address
        finally:
            self._nursery = None
            host.remove_listener(change_token)
            if awareness is not None and awareness_token is not None:
                awareness.remove_awareness_listener(awareness_token)
            remove = getattr(host, "remove_docs_listener", None)
            if remove is not None:  # not in the SyncHost contract; the spaces service has it
                remove(docs_token)

    def add_address(
        self, host: str, port: int, device_id: str | None = None, source: str = "static"
    ) -> None:
        """Dial `host:port` from now on (discovery, invites and `--peer` call this)."""
        if device_id is not None and device_id == self.identity.device_id:
            return
        key = (host, port)
        target = self._targets.get(key)
        if target is not None:
            if target.is_self:
                return
            if device_id is not None and device_id != target.device:
                self._retarget(target, device_id)
                target.backoff.reset()
                target.wake.set()
            return
        target = _Target(host, port, device_id, source, self.config.new_backoff(self._rng))
        self._targets[key] = target
        row = self._row(self._target_key(target), device_id)
        if row.address is None or device_id is not None:
            row.address = target.address
        if self._nursery is not None:
            self._nursery.start_soon(self._dial_loop, target)

    def remove_address(self, host: str, port: int) -> None:
        """Stop dialing `host:port` (a discovery record expired). A connection in progress or
        established over it stays up; it is just not redialed."""
        target = self._targets.pop((host, port), None)
        if target is None:
            return
        target.removed = True
        if target.scope is not None and not target.dialing:
            target.scope.cancel()
        if target.device is None:
            row = self._rows.get(self._target_key(target))
            if row is not None and not row.links:
                del self._rows[self._target_key(target)]

    def peers(self) -> list[dict[str, Any]]:
        """The peers table: every known device (or dialed address not reached yet)."""
        rows = sorted(
            self._rows.values(), key=lambda r: (r.name or "", r.device or r.address or "")
        )
        return [self._row_dict(r) for r in rows]

    async def op_peers(self, args: dict[str, Any], session: Any) -> dict[str, Any]:
        """The local socket operation `peers` (register with `Operations.register`)."""
        return {
            "device": self.identity.device_id,
            "name": self.identity.name,
            "peers": self.peers(),
        }

    # -- rows ----------------------------------------------------------------------------------

    @staticmethod
    def _target_key(target: _Target) -> str:
        return target.device if target.device is not None else f"@{target.address}"

    def _row(self, key: str, device: str | None) -> _Row:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(device)
            self._evict()
        return row

    def _evict(self) -> None:
        """Forget the oldest idle rows nobody dials once the table is over its limit."""
        excess = len(self._rows) - self.config.max_rows
        if excess <= 0:
            return
        dialed = {self._target_key(t) for t in self._targets.values()}
        idle = sorted(
            (r.since, k)
            for k, r in self._rows.items()
            if k not in dialed and not r.links and not r.pending
        )
        for _, key in idle[:excess]:
            del self._rows[key]

    def _row_dict(self, row: _Row) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": row.device,
            "name": row.name,
            "address": row.address,
            "state": row.state,
            # while redialing, why the last attempt failed (as hub rows do): a peer retried for
            # minutes should not read as a fresh `connecting` with no reason
            "reason": row.reason if row.state != CONNECTED else None,
            "since": row.since,
        }
        if row.state == DISCONNECTED and row.versions is not None:
            out["versions"] = row.versions
        if row.links:
            link = row.links[0]
            assert link.conn is not None
            # The live connection's address: a dialed address known for the device (say from
            # discovery or an invite) need not be the one this connection came in on, and may
            # not even work (a listener bound to another address).
            out["address"] = link.address
            out["spaces"] = len(link.conn.spaces)
            out["direction"] = "outgoing" if link.dialer else "incoming"
            out["synced"] = row.synced
            out["bytes_sent"] = link.bytes_sent
            out["bytes_received"] = link.bytes_received
        return out

    def _refresh(self, row: _Row) -> None:
        """Recompute a row's state; emit `peer-connected` / `peer-disconnected` on changes."""
        state = CONNECTED if row.links else CONNECTING if row.pending else DISCONNECTED
        if state != row.state:
            row.state = state
            row.since = time.time()
            self._changed.set()
            self._changed = trio.Event()
        reason = row.reason if state == DISCONNECTED else None
        if state == CONNECTING or row.emitted == (state, reason):
            return
        if state == DISCONNECTED and row.emitted is None and reason is None:
            return
        row.emitted = (state, reason)
        kind = "peer-connected" if state == CONNECTED else "peer-disconnected"
        try:
            self.emit_event(kind, **self._row_dict(row))
        except Exception:
            log.exception("emitting %s failed", kind)

    def _connected(self, device: str | None) -> bool:
        row = self._rows.get(device) if device is not None else None
        return row is not None and bool(row.links)

    def _retarget(self, target: _Target, device: str) -> None:
        """The address turned out to be (or is announced as) `device`: move its row."""
        old_key = self._target_key(target)
        target.device = device
        old = self._rows.get(old_key)
        row = self._row(device, device)
        row.address = target.address
        if old is not None and old is not row:
            moved = {lk for lk in old.pending if getattr(lk, "target", None) is target}
            row.pending |= moved
            old.pending -= moved
            if old_key.startswith("@"):
                del self._rows[old_key]
            else:
                self._refresh(old)
        self._refresh(row)

    # -- connections ---------------------------------------------------------------------------

    def _new_link(self, *, dialer: bool, address: str) -> Link:
        session_config = self.config.session

        def make_conn(now: float) -> PeerConnection:
            return PeerConnection(
                self.identity,
                self.host,
                dialer=dialer,
                now=now,
                config=session_config,
                model=self.model,
            )

        return Link(
            make_conn,
            dialer=dialer,
            address=address,
            on_event=self._on_event,
            config=self.config,
            host=self.host,
        )

    async def _serve_inbound(self, ws: WebSocket, slot: Slot | None = None) -> None:
        link = self._new_link(dialer=False, address=remote_address(ws))
        link.slot = slot  # released once the peer authenticates (`_on_established`)
        try:
            await link.run(ws)
        finally:
            if slot is not None:
                slot.release()

    async def _dial_loop(self, target: _Target) -> None:
        with trio.CancelScope() as scope:
            target.scope = scope
            while not target.is_self:
                while self._connected(target.device):
                    await self._changed.wait()
                target.dialing = True
                try:
                    await self._dial_once(target)
                finally:
                    target.dialing = False
                if target.is_self or target.removed:
                    break
                with trio.move_on_after(target.backoff.next_delay()):
                    await target.wake.wait()
                target.wake = trio.Event()
        if target.is_self:
            self._targets.pop((target.host, target.port), None)
            self._rows.pop(f"@{target.address}", None)

    async def _dial_once(self, target: _Target) -> None:
        link = self._new_link(dialer=True, address=target.address)
        link.target = target
        row = self._row(self._target_key(target), target.device)
        row.pending.add(link)
        self._refresh(row)
        try:
            await dial(link, target.host, target.port)
        except Unreachable as exc:
            log.debug("peers: %s unreachable: %s", target.address, exc)
            row = self._row(self._target_key(target), target.device)
            row.pending.discard(link)
            if not row.links:
                row.reason, row.versions = exc.reason, None
            self._refresh(row)
        except Exception:
            log.exception("peers: dialing %s failed", target.address)
            row = self._row(self._target_key(target), target.device)
            row.pending.discard(link)
            if not row.links:
                row.reason, row.versions = CLOSED, None
            self._refresh(row)

    def _on_event(self, link: Link, event: Event) -> None:
        target = link.target if isinstance(link.target, _Target) else None
        if isinstance(event, HelloReceived):
            self._on_hello(link, target, event)
        elif isinstance(event, Established):
            self._on_established(link, event)
        elif isinstance(event, Synced):
            row = self._rows.get(link.peer_device or "")
            if row is not None:
                row.synced = True
            if target is not None:
                target.backoff.reset()
        elif isinstance(event, AwarenessReceived):
            if self.awareness is not None:
                self.awareness.awareness_received(link.awareness_source, event.doc, event.payload)
        elif isinstance(event, Closed):
            if self.awareness is not None and link.conn is not None and link.conn.established:
                self.awareness.awareness_closed(link.awareness_source)
            self._on_closed(link, target, event)
        elif isinstance(event, SpaceKeyReceived):  # the host judges it (a member's, newer)
            receive = getattr(self.host, "receive_space_key", None)
            if receive is not None:
                receive(event.space, event.epoch, event.secret, event.sender)
        elif isinstance(event, DocFailed):  # that environment's error; the link goes on
            peer = f"peer:{link.peer_device}"
            self.emit_event(
                "environment-error", id=event.doc, origin=peer, follower=peer, reason=event.reason
            )

    def _on_hello(self, link: Link, target: _Target | None, event: HelloReceived) -> None:
        """The peer's unproven claims: no row changes (a dialed link already counts as pending
        in its address's row); only our own id stops a dial loop (we dialed ourselves)."""
        if event.hello.device == self.identity.device_id and target is not None:
            target.is_self = True

    def _on_established(self, link: Link, event: Established) -> None:
        if link.slot is not None:
            link.slot.release()
        target = link.target if isinstance(link.target, _Target) else None
        if target is not None and target.device != event.device:
            self._retarget(target, event.device)  # proven: the address is this device's
        row = self._row(event.device, event.device)
        row.pending.discard(link)
        row.name = event.name
        row.links.append(link)
        if link.dialer or row.address is None:
            row.address = link.address
        row.reason, row.versions = None, None
        log.info(
            "peers: connected to %s (%s) at %s, %d common spaces",
            event.name,
            event.device,
            link.address,
            len(event.spaces),
        )
        self._tie_break(row, event.device)
        self._refresh(row)
        if self.awareness is not None and link.closed is None:
            self.awareness.awareness_opened(link.awareness_source, self.host.docs_of(event.spaces))

    def _tie_break(self, row: _Row, peer: str) -> None:
        """Keep one connection per device pair; both sides reach the same choice."""
        me = self.identity.device_id

        def dialed_by(link: Link) -> str:
            return me if link.dialer else peer

        preferred = min(me, peer)
        live = [lk for lk in row.links if lk.closed is None]
        chosen = preferred if any(dialed_by(lk) == preferred for lk in live) else max(me, peer)
        losers = [lk for lk in live if dialed_by(lk) != chosen]
        if chosen == me:  # several of my own dials got through: I keep the oldest
            losers += [lk for lk in live if dialed_by(lk) == me][1:]
        for loser in losers:
            loser.close(DUPLICATE, "another connection to this device is kept")

    def _on_closed(self, link: Link, target: _Target | None, event: Closed) -> None:
        if event.reason == SELF:
            if target is not None:
                target.is_self = True
            return
        proven = self._proven(link)
        device = proven.device if proven is not None else None  # never a mere claim
        if target is not None:
            if device is not None and target.device != device:
                self._retarget(target, device)  # proven, if not established
            key = self._target_key(target)
        elif device is not None:
            key = device
        else:
            log.debug(
                "peers: unauthenticated connection from %s failed: %s %s",
                link.address,
                event.reason,
                event.detail,
            )
            return  # an inbound connection that never proved who it is: no device's row
        row = self._rows.get(key)
        if row is None:
            if event.reason == DUPLICATE:
                return
            row = self._row(key, device)
            row.address = link.address
        was_established = link in row.links
        if was_established:
            row.links.remove(link)
        row.pending.discard(link)
        if proven is not None and not row.name:
            row.name = proven.name
        if not row.links:
            row.synced = False
            if event.reason != DUPLICATE:
                row.reason, row.versions = event.reason, event.versions
            else:  # the kept connection ended first
                row.reason, row.versions = CLOSED, None
        if was_established:
            log.info("peers: link to %s closed: %s %s", key, event.reason, event.detail)
        else:
            log.debug("peers: connection with %s failed: %s %s", key, event.reason, event.detail)
        self._refresh(row)

    @staticmethod
    def _proven(link: Link) -> Established | PeerHello | None:
        """Who the peer proved to be: established, or at least its auth's signature verified
        (a peer refused for want of a common space is still known); None for mere claims."""
        conn = link.conn
        if conn is None:
            return None
        return conn.established or conn.handshake.verified

    # -- the daemon's changes ------------------------------------------------------------------

    def _links(self) -> list[Link]:
        return [lk for row in self._rows.values() for lk in row.links]

    def _on_local_change(self, doc: str, update: bytes, origin: str) -> None:
        for link in self._links():
            link.local_update(doc, update, origin)

    def _on_awareness(self, doc: str, payload: bytes, exclude: str | None, to: str | None) -> None:
        """Presence to send: to one link (`to`) or to every link but `exclude`."""
        for link in self._links():
            source = link.awareness_source
            if source != exclude and (to is None or source == to):
                link.send_awareness(doc, payload)

    def _on_docs_changed(self) -> None:
        for link in self._links():
            link.docs_changed()
        if self.awareness is not None:  # presence of the documents a link syncs now
            for link in self._links():
                if link.closed is None:
                    self.awareness.awareness_opened(
                        link.awareness_source, self.host.docs_of(link.conn.spaces)
                    )
        secrets = self._secrets()
        if secrets != self._space_secrets:
            # A space was joined or left: a peer that was unauthorized may not be any more.
            self._space_secrets = secrets
            for target in self._targets.values():
                target.backoff.reset()
                target.wake.set()

    def _secrets(self) -> frozenset[bytes]:
        return frozenset(k.secret for k in self.host.space_keys())
