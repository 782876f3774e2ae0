"""The hub's endpoint for daemons: the peer protocol in hub mode (docs/peer-protocol.md).

A daemon dials the hub's `/peer` path and speaks the LAN protocol unchanged (hellos, key
schedule, boxes, the Yjs sync session), except for what its auth proves: a hub holds no space
secrets, so instead of space tags the daemon shows an account token and names the spaces it
wants. `HubAuth` checks the token (`Accounts`: the daemon never sends it, only an HMAC keyed
with its hash over this connection's transcript, which the hub checks against the hashes it
stores), the user's simultaneous devices, and each space
(registering an unknown one with that user as its owner: the first attach), then answers which
spaces it accepted. The session then syncs those spaces' documents with `HubDocs` through
`_ScopedDocs`, a `SyncHost` limited to the connection's spaces: the core reads it, and the
daemon's `Link` applies the updates the core reports through it (a limit raising `DocRefused`).

A document the hub will not store (a limit) is refused with a per-document `error` rather than a
closed connection, so the daemon's other environments keep syncing and nothing stored is lost.
Tokens and memberships are checked again whenever the accounts change (an admin command's commit
is seen by `Accounts.refresh`), so a revoked token or a withdrawn membership ends a live
connection too.

The peer protocol (`peerdaemon.peer`, with `cryptography`) is loaded with the first daemon, not
at start: a hub that only serves y-websocket clients never needs it (issue 13, idle memory).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..core.awareness import AwarenessError
from ..core.identity import Identity, load_or_create_identity
from ..model import MODEL_VERSION
from .accounts import LimitExceeded
from .docs import StoreUnavailable

if TYPE_CHECKING:
    # loaded at the first daemon or awareness, not at start: the hub keeps them out of memory
    from ..peer import Event, Link, PeerConfig, PeerConnection, PeerHello
    from ..presence import Awareness

__all__ = ["HubAuth", "PeerEndpoint", "create_peer_endpoint"]

log = logging.getLogger("peerdaemon.hub.peers")

SPACE_PREFIX = "space:"
FILES_PREFIX = "files:"
PROOF_LEN = 32
MAX_SPACE_ID = 128
OK = "ok"
REGISTERED = "registered"
ROOMS = "yws"
"""The presence source of every y-websocket room's clients (they come and go with the rooms)."""
ROOMS_CLIENT = 0
"""The hub's own awareness client id: it publishes no state, so none is ever sent."""


class HubDocsLike(Protocol):
    """`peerdaemon.hub.docs.HubDocs`, as far as the endpoint uses it (docs/architecture.md)."""

    def has(self, space_id: str, doc_id: str) -> bool: ...
    def state_vector(self, space_id: str, doc_id: str) -> bytes: ...
    def diff(self, space_id: str, doc_id: str, state_vector: bytes) -> bytes: ...
    def apply(self, space_id: str, doc_id: str, update: bytes, origin: str) -> Any: ...
    def env_ids(self, space_id: str) -> list[str]: ...
    def needs_read(self, space_id: str, doc_id: str) -> bool: ...
    async def load_ahead(self, space_id: str, doc_id: str) -> None: ...
    def add_listener(self, fn: Callable[[str, str, bytes, str], None]) -> int: ...
    def remove_listener(self, token: int) -> None: ...


class DevicesLike(Protocol):
    def acquire(self, user: str, device: str) -> Any: ...  # a lease with release()


class AccountsLike(Protocol):
    """`peerdaemon.hub.accounts.Accounts`, as far as the endpoint uses it."""

    devices: DevicesLike

    def users_by_hash_prefix(self, prefix: bytes) -> list[tuple[str, Any]]: ...
    def user_of_hash(self, token_hash: str) -> Any: ...
    def space(self, space_id: str) -> dict[str, Any] | None: ...
    def create_space(self, space_id: str, owner: str, name: str = "") -> None: ...
    def can_access(self, user: str, space_id: str) -> bool: ...
    def limits_for(self, user: str) -> Any: ...
    def add_change_listener(self, fn: Callable[[], None]) -> int: ...
    def remove_change_listener(self, token: int) -> None: ...


def _limits_dict(limits: Any) -> dict[str, int]:
    out = {}
    for key in ("envs_per_space", "bytes_per_env", "devices_per_user"):
        value = getattr(limits, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
    return out


# -- the auth policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRequest:
    """The `hub` field of a daemon's auth, validated (docs/peer-protocol.md, "Hub mode")."""

    token_id: bytes  # the first 8 bytes of sha256(token)
    proof: bytes  # HMAC-SHA256(sha256(token), "peerdaemon-hub-token-v1" || role || th)
    spaces: tuple[str, ...]
    register: dict[str, str]  # space id -> name, for spaces the daemon may register

    @classmethod
    def parse(cls, auth: dict[str, Any]) -> HubRequest:
        from ..peer import HUB_TOKEN_ID_LEN, PeerProtocolError, messages

        hub = auth.get("hub")
        if hub is None:
            raise PeerProtocolError(
                messages.UNAUTHORIZED, "this is a hub: authenticate with a token (hub mode)"
            )
        token_id, proof = hub.get("token_id"), hub.get("proof")
        if not isinstance(token_id, bytes) or len(token_id) != HUB_TOKEN_ID_LEN:
            raise PeerProtocolError(
                messages.UNAUTHORIZED,
                f"auth.hub.token_id must be {HUB_TOKEN_ID_LEN} bytes (a token proof)",
            )
        if not isinstance(proof, bytes) or len(proof) != PROOF_LEN:
            raise PeerProtocolError(
                messages.UNAUTHORIZED, f"auth.hub.proof must be {PROOF_LEN} bytes"
            )
        spaces = hub.get("spaces", [])
        if not isinstance(spaces, list) or len(spaces) > messages.MAX_HUB_FIELD:
            raise PeerProtocolError(
                messages.PROTOCOL_ERROR, "auth.hub.spaces must be a list of space ids"
            )
        for space in spaces:
            if not isinstance(space, str) or not 0 < len(space) <= MAX_SPACE_ID:
                raise PeerProtocolError(
                    messages.PROTOCOL_ERROR, "auth.hub.spaces must hold space ids"
                )
        register: dict[str, str] = {}
        entries = hub.get("register", [])
        if not isinstance(entries, list) or len(entries) > messages.MAX_HUB_FIELD:
            raise PeerProtocolError(messages.PROTOCOL_ERROR, "auth.hub.register must be a list")
        for entry in entries:
            space = entry.get("space") if isinstance(entry, dict) else None
            name = entry.get("name", "") if isinstance(entry, dict) else None
            if not isinstance(space, str) or not isinstance(name, str):
                raise PeerProtocolError(
                    messages.PROTOCOL_ERROR, "auth.hub.register holds {space, name} maps"
                )
            register[space] = name[: messages.MAX_NAME]
        return cls(token_id, proof, tuple(dict.fromkeys(spaces)), register)

    def verify(self, token_hash: str, th: bytes, role: bytes) -> bool:
        """Does the proof show knowledge of the token whose stored hash (hex) is `token_hash`,
        on the connection whose transcript hash is `th`, by the sender of role `role`?"""
        from ..peer import hub_token_proof

        try:
            key = bytes.fromhex(token_hash)
        except ValueError:
            return False
        return hmac.compare_digest(hub_token_proof(key, role, th), self.proof)


class HubAuth:
    """The hub's `AuthPolicy` for one connection: token, devices per user, spaces."""

    def __init__(self, endpoint: PeerEndpoint) -> None:
        self.endpoint = endpoint
        self.user: str | None = None
        self.token_hash: str | None = None
        self.device: str | None = None
        self.lease: Any = None
        """The device slot (`Accounts.devices`) this connection holds; released when it ends."""
        self.statuses: dict[str, str] = {}
        self.accepted: frozenset[str] = frozenset()
        self.limits: dict[str, int] = {}

    def auth_fields(self, peer: PeerHello, th: bytes, role: bytes) -> dict[str, Any]:
        return {
            "tags": [],
            "hub": {"user": self.user, "spaces": dict(self.statuses), "limits": self.limits},
        }

    def accept(
        self, peer: PeerHello, auth: dict[str, Any], th: bytes, role: bytes
    ) -> frozenset[str]:
        from ..peer import PeerProtocolError, messages

        request = HubRequest.parse(auth)
        accounts = self.endpoint.accounts
        user = None
        for token_hash, candidate in accounts.users_by_hash_prefix(request.token_id):
            if request.verify(token_hash, th, role):  # every candidate: no early exit
                user = user or candidate
        if user is None:
            raise PeerProtocolError(messages.UNAUTHORIZED, "unknown or revoked token")
        name = user.name
        self.limits = _limits_dict(accounts.limits_for(name))
        try:  # before the spaces: a refused device registers nothing
            lease = accounts.devices.acquire(name, peer.device)
        except LimitExceeded as exc:
            raise PeerProtocolError(messages.TOO_MANY_DEVICES, exc.detail) from None
        try:
            accepted = self._spaces(name, request, peer.device, user.token_hash)
        except BaseException:
            lease.release()  # a refused connection must not hold a slot
            raise
        self.lease = lease
        self.user, self.token_hash, self.device = name, user.token_hash, peer.device
        removals = getattr(self.endpoint, "removals", None)
        if removals is not None:  # which token each device used (removals.py)
            removals.note(peer.device, user.token_hash)
        return accepted

    def _spaces(
        self, name: str, request: HubRequest, device: str = "", token_hash: str = ""
    ) -> frozenset[str]:
        from ..peer import PeerProtocolError, messages

        accounts = self.endpoint.accounts
        removals = getattr(self.endpoint, "removals", None)
        statuses: dict[str, str] = {}
        removed: list[str] = []
        for space in request.spaces:
            if removals is not None and removals.refused(space, device, token_hash):
                statuses[space] = messages.FORBIDDEN  # the device, or its token, was removed
                removed.append(space)
            elif accounts.can_access(name, space):
                statuses[space] = OK
            elif space in request.register and self.endpoint.register_space(
                space, name, request.register[space]
            ):
                statuses[space] = REGISTERED
            else:
                statuses[space] = messages.FORBIDDEN
        accepted = frozenset(s for s, status in statuses.items() if status != messages.FORBIDDEN)
        if not accepted and removed:
            raise PeerProtocolError(
                messages.DEVICE_REMOVED, f"removed from spaces: {', '.join(sorted(removed))}"
            )
        if not accepted:
            forbidden = ", ".join(sorted(statuses)) or "none asked"
            raise PeerProtocolError(
                messages.FORBIDDEN, f"user {name!r} may not sync spaces: {forbidden}"
            )
        self.statuses, self.accepted = statuses, accepted
        return accepted

    def spaces(self) -> frozenset[str]:
        return self.accepted


# -- the documents a link syncs ------------------------------------------------------------------


class _ScopedDocs:
    """A `SyncHost` over HubDocs for one daemon: only its accepted spaces' documents.

    Doc ids are the daemons' (`space:<id>` and env ids); HubDocs keys them by space, so an env id
    is mapped to the accepted space whose document lists it as shared.

    A document whose first use would read a store that blocks the event loop (PostgreSQL, in
    scaled mode: `needs_read`) is not shown to the session until the link's loader task has
    read it in a worker thread (`wanted`, then `docs_changed`): until then the session neither
    offers it nor answers for it (the daemon's step 1 waits, deferred; its updates come back in
    its answer to our step 1). Once shown, a document is always shown (a later load, after an
    eviction, reads in the event loop as a last resort). Should the store still be away then,
    the link closes with `shutdown` and the daemon redials: nothing it sent is lost, since it
    keeps its copy and the next sync brings it again.
    """

    def __init__(self, endpoint: PeerEndpoint, auth: HubAuth) -> None:
        self.endpoint = endpoint
        self.auth = auth
        self.refused: dict[str, tuple[str, Any]] = {}
        """doc -> (space, the space's limits when it was refused): a change of those limits
        makes the daemon reconnect and offer the document again."""
        self.shown: set[tuple[str, str]] = set()
        self.wanted: set[tuple[str, str]] = set()
        """Documents to read ahead before they are shown (the loader task's work)."""
        self.wakeup: trio.Event | None = None
        """Wakes the loader task; None (no task): every document is shown at once."""
        self.conn: Any = None
        """The link's `PeerConnection`, closed if the store is away when a document is used."""

    def _ready(self, space: str, doc_id: str) -> bool:
        """Whether the document may be shown to the session (else its read ahead is asked for)."""
        key = (space, doc_id)
        if key in self.shown:
            return True
        needs_read = getattr(self.endpoint.hub_docs, "needs_read", None)
        if self.wakeup is not None and needs_read is not None and needs_read(space, doc_id):
            self.wanted.add(key)
            self.wakeup.set()
            return False
        self.shown.add(key)
        return True

    def _unavailable(self, exc: StoreUnavailable) -> None:
        """The store is away as the session needs a document: the daemon redials later."""
        from ..peer import messages

        log.warning("hub: closing a daemon's link: the store cannot be read now (%s)", exc)
        if self.conn is not None:
            self.conn.close(messages.SHUTDOWN, "the hub cannot read its documents now: redial")

    def space_keys(self) -> list[Any]:
        return []  # a hub holds no space secrets

    def _space_of(self, doc_id: str, space_ids: Iterable[str]) -> str | None:
        """The accepted space of a shown document (StoreUnavailable: see the class)."""
        ids = [s for s in space_ids if s in self.auth.accepted]
        if doc_id.startswith(SPACE_PREFIX):
            space = doc_id[len(SPACE_PREFIX) :]
            return space if space in ids and self._ready(space, doc_id) else None
        env_id = doc_id
        if doc_id.startswith(FILES_PREFIX):  # an environment's files go where it goes
            env_id = doc_id[len(FILES_PREFIX) :]
        for space in ids:
            if self._ready(space, SPACE_PREFIX + space) and env_id in self.endpoint.envs_of(space):
                return space if self._ready(space, doc_id) else None
        return None

    def docs_of(self, space_ids: Iterable[str]) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        try:
            for space in space_ids:
                if space not in self.auth.accepted or not self._ready(space, SPACE_PREFIX + space):
                    continue
                envs = sorted(self.endpoint.envs_of(space))
                files = [FILES_PREFIX + env for env in envs]
                for doc in [SPACE_PREFIX + space, *envs, *files]:
                    if doc not in seen and self._ready(space, doc):
                        seen.add(doc)
                        out.append(doc)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return []
        return out

    def allowed(self, doc_id: str, space_ids: Iterable[str]) -> bool:
        try:
            return self._space_of(doc_id, space_ids) is not None
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return False

    def space_of(self, doc_id: str) -> str | None:
        """The accepted space `doc_id` belongs to (presence is kept per space)."""
        try:
            return self._space_of(doc_id, self.auth.accepted)
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return None

    def state_vector(self, doc_id: str) -> bytes | None:
        try:
            space = self._space_of(doc_id, self.auth.accepted)
            if space is None:
                return None
            docs = self.endpoint.hub_docs
            return docs.state_vector(space, doc_id) if docs.has(space, doc_id) else b"\x00"
        except StoreUnavailable as exc:
            self._unavailable(exc)  # (closed: what the session sends now is dropped)
            return b"\x00"

    def diff(self, doc_id: str, state_vector: bytes) -> bytes:
        try:
            space = self._space_of(doc_id, self.auth.accepted)
            docs = self.endpoint.hub_docs
            if space is None or not docs.has(space, doc_id):
                return b"\x00\x00"
            return docs.diff(space, doc_id, state_vector)
        except StoreUnavailable as exc:
            self._unavailable(exc)  # (closed: this answer is never sent)
            return b"\x00\x00"

    def apply(self, doc_id: str, update: bytes, origin: str) -> None:
        try:
            space = self._space_of(doc_id, self.auth.accepted)
            if space is None:
                return
            self.endpoint.hub_docs.apply(space, doc_id, update, origin)
        except StoreUnavailable as exc:
            self._unavailable(exc)  # not taken: the daemon keeps it and sends it again
            return
        except LimitExceeded as exc:
            from ..peer import DocRefused

            assert space is not None
            log.info("hub: refused %s/%s from %s: %s", space, doc_id, origin, exc)
            self.refused[doc_id] = (space, self.endpoint.space_limits(space))
            raise DocRefused(exc.reason, exc.detail) from None
        self.refused.pop(doc_id, None)
        if doc_id == SPACE_PREFIX + space:
            self.endpoint.space_doc_changed(space)  # shares now, not once the update is durable


# -- the endpoint --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Daemon:
    """One authenticated daemon connection."""

    link: Link
    auth: HubAuth
    host: _ScopedDocs
    since: float = field(default_factory=time.time)


class PeerEndpoint:
    """Serves daemons on the hub's `/peer` path; the server calls `handle_peer(ws)` per socket."""

    READ_RETRY = 1.0
    """Seconds before a document the store could not give is read ahead again."""

    def __init__(
        self,
        hub_docs: HubDocsLike,
        accounts: AccountsLike,
        events: Any = None,
        *,
        identity: Identity | None = None,
        config: PeerConfig | None = None,
        model: int = MODEL_VERSION,
    ) -> None:
        self.hub_docs = hub_docs
        self.accounts = accounts
        self.events = events
        self.identity = identity or self._identity(hub_docs)
        self._config = config
        self.model = model
        self._daemons: dict[Link, _Daemon] = {}
        self._envs: dict[str, frozenset[str]] = {}
        self._awareness: dict[str, Awareness] = {}
        """Per space, the presence the daemons and the y-websocket rooms send (docs/presence.md):
        the hub relays it (only changes) and removes a daemon's states when its link closes."""
        self._rooms: Any = None
        self._listener = hub_docs.add_listener(self._on_change)
        self._accounts_listener = accounts.add_change_listener(self._recheck)
        self.removals: Any = None
        """`removals.Removals` (set by the server): devices and tokens a space refuses."""

    @property
    def config(self) -> PeerConfig:
        if self._config is None:
            from ..peer import PeerConfig

            self._config = PeerConfig()
        return self._config

    @staticmethod
    def _identity(hub_docs: Any) -> Identity:
        """The hub's device key: kept in the hub store's settings when there is one, so daemons
        see the same hub device id across restarts."""
        store = getattr(hub_docs, "store", None)
        if store is not None and hasattr(store, "get_setting"):
            try:
                return load_or_create_identity(store, "hub")
            except Exception:
                log.exception("hub: could not keep an identity in the store; using a new one")
        return Identity.generate("hub")

    def bridge_rooms(self, rooms: Any) -> None:
        """Carry presence between the daemons and the y-websocket rooms (`ywebsocket.Rooms`):
        what the rooms' clients send reaches the daemons of the space, and the daemons' states
        reach the rooms' clients."""
        self._rooms = rooms
        rooms.awareness_listener = self._from_rooms
        rooms.awareness_provider = self._awareness_snapshot

    def _space_awareness(self, space_id: str) -> Awareness:
        core = self._awareness.get(space_id)
        if core is None:
            from ..presence import Awareness

            core = self._awareness[space_id] = Awareness(ROOMS_CLIENT)
        return core

    def _from_rooms(self, space_id: str, doc_id: str, payload: bytes) -> None:
        core = self._space_awareness(space_id)
        try:
            core.receive(ROOMS, doc_id, payload, time.monotonic())
        except AwarenessError:
            return
        self._send_awareness(space_id)

    def _awareness_snapshot(self, space_id: str, doc_id: str) -> bytes | None:
        core = self._awareness.get(space_id)
        return core.snapshot(doc_id) if core is not None else None

    def _send_awareness(self, space_id: str) -> None:
        """The space's presence core's sends: to its daemons, and to the rooms."""
        core = self._awareness.get(space_id)
        if core is None:
            return
        core.handle_timer(time.monotonic())  # time-outs (the hub holds no state of its own)
        for send in core.sends():
            if send.to is None and send.exclude != ROOMS and self._rooms is not None:
                self._rooms.inject_awareness(space_id, send.doc, send.payload)
            for daemon in list(self._daemons.values()):
                link = daemon.link
                if space_id not in daemon.auth.accepted or link.closed is not None:
                    continue
                source = link.awareness_source
                if source != send.exclude and (send.to is None or send.to == source):
                    link.send_awareness(send.doc, send.payload)
        core.changes()  # the hub shows no presence of its own

    def close(self) -> None:
        """Stop following HubDocs and Accounts (the links end with the server's nursery)."""
        self.hub_docs.remove_listener(self._listener)
        self.accounts.remove_change_listener(self._accounts_listener)

    # -- for the auth policy and the scoped hosts --------------------------------------------------

    def register_space(self, space_id: str, owner: str, name: str) -> bool:
        """Create an unknown space with `owner` (the first attach); False if it exists."""
        if self.accounts.space(space_id) is not None:
            return False
        try:
            self.accounts.create_space(space_id, owner, name)
        except Exception as exc:  # it exists (someone else's), or the id is refused
            log.info("hub: not registering space %s for %s: %s", space_id, owner, exc)
            return False
        log.info("hub: registered space %s (%r) for user %s", space_id, name, owner)
        self._emit("space-registered", space=space_id, owner=owner, name=name)
        return self.accounts.can_access(owner, space_id)

    def space_doc_changed(self, space_id: str) -> None:
        self._envs.pop(space_id, None)

    def space_limits(self, space_id: str) -> Any:
        limits = getattr(self.accounts, "space_limits", None)
        return limits(space_id) if callable(limits) else None

    def envs_of(self, space_id: str) -> frozenset[str]:
        envs = self._envs.get(space_id)
        if envs is None:
            envs = self._envs[space_id] = frozenset(self.hub_docs.env_ids(space_id))
        return envs

    # -- connections ---------------------------------------------------------------------------

    async def handle_peer(self, ws: Any) -> None:
        """Run one daemon's connection until it ends (`ws`: the hub's `HubWebSocket`, or a
        trio-websocket connection)."""
        from ..peer import Link, PeerConnection

        address = _address(getattr(ws, "remote", None))
        auth = HubAuth(self)
        host = _ScopedDocs(self, auth)

        session_config = self.config.session

        def make_conn(now: float) -> PeerConnection:
            return PeerConnection(
                self.identity,
                host,
                dialer=False,
                now=now,
                config=session_config,
                model=self.model,
                auth=auth,
            )

        def make_host_conn(now: float) -> PeerConnection:
            host.conn = make_conn(now)
            return host.conn

        link = Link(
            make_host_conn,
            dialer=False,
            address=address,
            on_event=self._on_event,
            config=self.config,
            host=host,  # the daemon's updates are applied (and refused) through its scope
        )
        link.slot = getattr(ws, "slot", None)  # released once the hub accepted the daemon
        self._daemons[link] = _Daemon(link, auth, host)
        try:
            async with trio.open_nursery() as nursery:
                host.wakeup = trio.Event()
                nursery.start_soon(self._read_ahead, link, host)
                await link.run(ws)
                nursery.cancel_scope.cancel()
        finally:
            self._daemons.pop(link, None)
            if auth.lease is not None:
                auth.lease.release()

    async def _read_ahead(self, link: Link, host: _ScopedDocs) -> None:
        """Read the documents the link's session asked for (`_ScopedDocs.wanted`) off the event
        loop, then show them to it; those the store cannot give now are tried again every
        `READ_RETRY` s (the link's other documents sync meanwhile)."""
        docs = self.hub_docs
        while True:
            if not host.wanted:
                assert host.wakeup is not None
                await host.wakeup.wait()
            host.wakeup = trio.Event()
            failed = False
            for space, doc in sorted(host.wanted):
                try:
                    await docs.load_ahead(space, doc)
                except StoreUnavailable as exc:
                    log.warning("hub: %s/%s waits for the store: %s", space, doc, exc)
                    failed = True
                    continue
                except Exception:  # unreadable bytes: skipped by HubDocs (as if not stored)
                    log.exception("hub: reading %s/%s ahead failed", space, doc)
                host.wanted.discard((space, doc))
            link.docs_changed()  # shows what was read (and asks for what it lists next)
            if failed:
                await trio.sleep(self.READ_RETRY)

    def daemons(self) -> list[dict[str, Any]]:
        """The connected daemons (for the hub's status)."""
        return [
            {
                "device": d.link.peer_device,
                "name": d.link.conn.peer_name if d.link.conn is not None else None,
                "user": d.auth.user,
                "address": d.link.address,
                "spaces": sorted(d.auth.accepted),
                "since": d.since,
            }
            for d in self._daemons.values()
            if d.auth.user is not None and d.link.closed is None
        ]

    def deny_device(self, user: str, device: str, detail: str) -> int:
        """End `user`'s links from `device` as a refusal at admission would
        (`too-many-devices`): the cluster's device slots refused it after this process let it
        in (hub/cluster/devices.py). Returns how many links were closed."""
        from ..peer import messages

        closed = 0
        for daemon in list(self._daemons.values()):
            auth, link = daemon.auth, daemon.link
            if auth.user == user and auth.device == device and link.closed is None:
                link.close(messages.TOO_MANY_DEVICES, detail)
                closed += 1
        return closed

    def _recheck(self) -> None:
        """The accounts changed: end the links whose token was revoked or whose membership of a
        space was withdrawn, and those that would now get more (a space they were refused, a
        limit that refused a document changed): the daemon redials and learns where it stands."""
        if not self._daemons:
            return
        from ..peer import messages

        accounts = self.accounts
        for daemon in list(self._daemons.values()):
            auth, link = daemon.auth, daemon.link
            if auth.user is None or auth.token_hash is None or link.closed is not None:
                continue
            try:
                user = accounts.user_of_hash(auth.token_hash)
                if user is None or user.name != auth.user:
                    link.close(messages.UNAUTHORIZED, "the token was revoked")
                    continue
                lost = sorted(s for s in auth.accepted if not accounts.can_access(auth.user, s))
                gained = sorted(
                    s
                    for s, status in auth.statuses.items()
                    if status == messages.FORBIDDEN and accounts.can_access(auth.user, s)
                )
                limits_changed = any(
                    self.space_limits(space) != limits
                    for space, limits in daemon.host.refused.values()
                )
            except Exception:
                log.exception("hub: rechecking a daemon's access failed")
                continue
            if lost:
                link.close(messages.FORBIDDEN, f"access to spaces {', '.join(lost)} was withdrawn")
            elif gained:
                link.close(
                    messages.SHUTDOWN, f"access to spaces {', '.join(gained)} was granted: redial"
                )
            elif limits_changed:
                link.close(
                    messages.SHUTDOWN, "the limits changed: redial to offer refused documents"
                )

    def _on_event(self, link: Link, event: Event) -> None:
        from ..peer import AwarenessReceived, Closed, DocFailed, Established, messages

        daemon = self._daemons.get(link)
        if daemon is None:
            return
        if isinstance(event, Established):
            if link.slot is not None:  # authenticated: no longer half-open on the hub's port
                link.slot.release()
            for other in list(self._daemons.values()):
                if (
                    other is not daemon
                    and other.auth.device == event.device
                    and other.link.closed is None
                ):
                    other.link.close(messages.DUPLICATE, "the device connected again")
            daemon.since = time.time()
            for space in sorted(daemon.auth.accepted):
                docs = daemon.host.docs_of([space])
                self._space_awareness(space).link_opened(
                    link.awareness_source, docs, time.monotonic()
                )
                self._send_awareness(space)
            log.info(
                "hub: daemon %s (%s) of user %s connected from %s: spaces %s",
                event.name,
                event.device,
                daemon.auth.user,
                link.address,
                ", ".join(sorted(daemon.auth.accepted)),
            )
            self._emit(
                "daemon-connected",
                device=event.device,
                name=event.name,
                user=daemon.auth.user,
                spaces=sorted(daemon.auth.accepted),
                statuses=dict(daemon.auth.statuses),
            )
        elif isinstance(event, DocFailed):  # that environment's error here; the link goes on
            self._emit(
                "environment-error", id=event.doc, device=daemon.auth.device, reason=event.reason
            )
        elif isinstance(event, AwarenessReceived):
            space = daemon.host.space_of(event.doc)
            if space is not None:
                try:
                    self._space_awareness(space).receive(
                        link.awareness_source, event.doc, event.payload, time.monotonic()
                    )
                except AwarenessError as exc:
                    log.info("hub: bad awareness from %s: %s", link.peer_device, exc)
                    return
                self._send_awareness(space)
        elif isinstance(event, Closed):
            if link.conn is not None and link.conn.established:
                for space in sorted(daemon.auth.accepted):
                    core = self._awareness.get(space)
                    if core is not None:
                        core.link_closed(link.awareness_source, time.monotonic())
                        self._send_awareness(space)
            # a device id is a fact only once the handshake proved it; before, it is a claim
            conn = link.conn
            device = conn.established.device if conn and conn.established else None
            if daemon.auth.user is not None or event.reason != messages.UNAUTHORIZED:
                log.info(
                    "hub: daemon %s at %s closed: %s %s",
                    device or "(unauthenticated)",
                    link.address,
                    event.reason,
                    event.detail,
                )
            self._emit(
                "daemon-disconnected",
                device=device,
                address=link.address,
                user=daemon.auth.user,
                reason=event.reason,
                detail=event.detail,
            )

    def _on_change(self, space_id: str, doc_id: str, update: bytes, origin: str) -> None:
        """A stored document changed (any origin): forward it; a space document may change
        which environments the space shares."""
        is_space_doc = doc_id == SPACE_PREFIX + space_id
        if is_space_doc:
            self.space_doc_changed(space_id)
        for daemon in list(self._daemons.values()):
            if space_id not in daemon.auth.accepted or daemon.link.closed is not None:
                continue
            if is_space_doc and self._removed(daemon, space_id):
                continue
            daemon.link.local_update(doc_id, update, origin)
            if is_space_doc:
                daemon.link.docs_changed()

    def _removed(self, daemon: _Daemon, space_id: str) -> bool:
        """Close the link of a daemon the space document now lists as removed (or whose token
        a removed device used): it redials, and gets the spaces it may still sync."""
        removals, auth = self.removals, daemon.auth
        if removals is None or not removals.refused(space_id, auth.device, auth.token_hash):
            return False
        from ..peer import messages

        daemon.link.close(messages.DEVICE_REMOVED, f"removed from space {space_id}")
        return True

    def _emit(self, kind: str, **data: Any) -> None:
        emit = getattr(self.events, "emit", None)
        if emit is None:
            return
        try:
            emit(kind, **data)
        except Exception:
            log.exception("hub: emitting %s failed", kind)


def _address(remote: Any) -> str:
    from ..peer import format_address  # the trio shell: loaded with the first daemon's link

    if isinstance(remote, tuple) and len(remote) == 2:
        return format_address(str(remote[0]), int(remote[1]))
    if hasattr(remote, "address") and hasattr(remote, "port"):  # trio-websocket's Endpoint
        return format_address(str(remote.address), int(remote.port))
    return str(remote) if remote else "?"


def create_peer_endpoint(
    hub_docs: HubDocsLike, accounts: AccountsLike, events: Any
) -> PeerEndpoint:
    """The factory the hub server builds its `/peer` endpoint with (`HubConfig.peer_endpoint`)."""
    return PeerEndpoint(hub_docs, accounts, events)
