"""The daemon's links to hubs: `space hub SPACE URL --token TOKEN` and what keeps it synced.

Attachments live in the store setting `"hubs"`: `{url: {"token": str, "spaces": [space id],
"device": str?, "trust_first_use": bool?}}` (the token is a secret: it is never returned by an
operation, printed, logged, or sent to the hub, which gets only a proof of it bound to the
connection). `device` is the hub's key fingerprint (its device id): given with `--hub-key`, taken
from the invite the space was joined with, or pinned on the first connection that authenticated
the hub (`wss://`) or that the user allowed to trust it (`--trust-first-use`). A hub showing
another key is refused with `hub-key-changed`, and an unpinned hub over a channel that did not
authenticate it with `hub-key-unknown`, both before the daemon sends anything but its hello: no
token proof, no space id, no document. One `HubDialer` per hub URL dials
`ws(s)://HOST:PORT[/PREFIX]/peer` and runs a `Link` over it: the peer protocol's hub-mode
handshake (docs/peer-protocol.md, "Hub mode"), then a sync session over the attached spaces with
the `SpacesService` as its `SyncHost` (the `Link` applies the hub's updates through it), exactly
like a LAN connection. Updates from the hub carry the origin `hub:<url>` and are never sent
back to it; the LAN links forward them like any other change, and Yjs makes the copies that come
back the other way no-ops, so an update never loops between the LAN and the hub, whichever path
it takes first.

A hub may refuse one document (`quota-exceeded`, `environment-too-large`) without closing the
connection: the refusal shows in `status` and `peers` and as a `hub-limit` event, the daemon
keeps its copy, and the other documents keep syncing. The dialer redials with the LAN's backoff
(`Backoff`) after any failure (`unauthorized`, `too-many-devices`, `incompatible-version`...),
whose reason shows too.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from ..core.errors import (
    BAD_REQUEST,
    NOT_FOUND,
    OpError,
    Pending,
)
from ..core.events import EventLog
from ..core.identity import Identity
from ..model import MODEL_VERSION
from ..peer import (
    AwarenessHost,
    AwarenessReceived,
    Backoff,
    Closed,
    DocError,
    DocFailed,
    Established,
    Event,
    HelloReceived,
    Link,
    PeerConfig,
    PeerConnection,
    PeerHello,
    PeerProtocolError,
    Synced,
    Unreachable,
    hub_token_hash,
    hub_token_id,
    hub_token_proof,
    messages,
)
from ..peer import dial as peer_dial
from ..spaces import SpaceError, SpacesService
from ..store import Store, Ticket

log = logging.getLogger("peerdaemon.hublink")

HUBS_SETTING = "hubs"
PEER_PATH = "/peer"
MAX_TOKEN = 1024
CONNECTED = "connected"
CONNECTING = "connecting"
DISCONNECTED = "disconnected"
IDLE = "idle"
"""Attached, but to no space this device still holds: nothing to dial."""
PENDING = "pending"
"""A space's status before the hub has answered for it."""
HUB_KEY_UNKNOWN = "hub-key-unknown"
"""Our close reason for an unpinned hub over a channel that did not authenticate it (a local
reason: the hub reads it as `closed`)."""
MAX_WAIT = 60.0
"""The longest `space.hub` waits for the hub's first answer (`wait`)."""
ACCEPTED = ("ok", "registered")


def normalize_hub_key(text: object) -> str:
    """A hub key fingerprint as a user typed it -> the hub's device id; ValueError otherwise.

    The fingerprint is the device id the hub's hello shows (base32 of the SHA-256 of its
    Ed25519 public key, 52 characters, peerdaemon/identity.py); case, spaces and dashes are
    ignored, so a fingerprint read aloud or re-wrapped still matches."""
    if not isinstance(text, str):
        raise ValueError("the hub key must be a string")
    raw = "".join(ch for ch in text.upper() if ch not in "- \t\r\n")
    try:
        ok = len(raw) == 52 and len(base64.b32decode(raw + "====")) == 32
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{text!r} is not a hub key fingerprint (52 base32 characters, as "
            "`peerdaemon hub status` prints it)"
        )
    return "-".join(raw[i : i + 7] for i in range(0, 52, 7))


# -- URLs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubUrl:
    """Where a hub's daemon endpoint is; `url` is the canonical form used as key and origin."""

    url: str
    host: str
    port: int
    path: str
    tls: bool


def parse_hub_url(text: str) -> HubUrl:
    """`ws://`, `wss://`, `http://` or `https://` `HOST[:PORT][/PREFIX]` -> where to dial.

    The daemons' endpoint is `PREFIX/peer` (a trailing `/peer` in the URL is accepted too), so
    the URL a user gets for the hub's web clients works here as well.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the hub URL is empty")
    parts = urlsplit(text.strip())
    scheme = {"ws": "ws", "http": "ws", "wss": "wss", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"{text!r}: a hub URL starts with ws://, wss://, http:// or https://")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not host:
        raise ValueError(f"{text!r} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r}: a hub URL has no query, fragment or credentials")
    tls = scheme == "wss"
    port = port or (443 if tls else 80)
    prefix = parts.path.rstrip("/")
    if prefix.endswith(PEER_PATH):
        prefix = prefix[: -len(PEER_PATH)]
    netloc = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{netloc}:{port}{prefix}"
    return HubUrl(url, host, port, prefix + PEER_PATH, tls)


async def dial(link: Link, target: HubUrl) -> Closed:
    """Open the hub's websocket and run `link` over it; `Unreachable` if it never opens."""
    return await peer_dial(link, target.host, target.port, path=target.path, tls=target.tls)


# -- the daemon's auth policy --------------------------------------------------------------------


class HubClientAuth:
    """The daemon's `AuthPolicy` in hub mode: a proof of the token and the spaces to attach,
    instead of tags.

    The token itself is never sent: the auth carries `token_id` (the first 8 bytes of its
    SHA-256, for the hub to find it) and `proof`, an HMAC keyed with that SHA-256 (which the hub
    stores) over this connection's transcript hash and our role. A man in the middle sees a
    different transcript on each side, so a proof it relays (or replays) does not verify.
    `pinned`: the hub's device id (its key fingerprint) this daemon trusts for the URL; a hub
    showing another one is refused before anything is sent (`hub-key-changed`). Without one, the
    hub is accepted only if `trust_first_use` (the channel authenticated the hub, as `wss://`
    does, or the user asked to trust its first key); otherwise it is refused the same way
    (`hub-key-unknown`): an impostor at the hub's address gets our hello and nothing else.
    """

    def __init__(
        self,
        token: str,
        spaces: dict[str, str],
        pinned: str | None = None,
        *,
        trust_first_use: bool = False,
    ) -> None:
        self.token = token
        self._token_hash = hub_token_hash(token)
        self.pinned = pinned
        self.trust_first_use = trust_first_use
        self.requested = dict(spaces)  # space id -> name (for the hub to register it)
        self.statuses: dict[str, str] = {}
        self.user: str | None = None
        self.limits: dict[str, Any] = {}
        self.accepted: frozenset[str] = frozenset()

    def auth_fields(self, peer: PeerHello, th: bytes, role: bytes) -> dict[str, Any]:
        if self.pinned is not None and peer.device != self.pinned:
            raise PeerProtocolError(
                messages.HUB_KEY_CHANGED,
                f"the hub shows key {peer.device}, not {self.pinned}, the one this daemon "
                "trusts for this URL (given with --hub-key, carried by the invite, or pinned at "
                "the first connection); if the hub's key really changed, attach again with "
                "`space hub SPACE URL --token TOKEN --hub-key NEW_FINGERPRINT`",
            )
        if self.pinned is None and not self.trust_first_use:
            raise PeerProtocolError(
                HUB_KEY_UNKNOWN,
                f"the hub's key is not known and this ws:// connection does not authenticate "
                f"it (it shows {peer.device}): give the fingerprint `peerdaemon hub status` "
                "prints on the hub with `space hub ... --hub-key FINGERPRINT`, or attach over "
                "wss://, or trust its first key with --trust-first-use",
            )
        return {
            "tags": [],
            "hub": {
                "token_id": hub_token_id(self._token_hash),
                "proof": hub_token_proof(self._token_hash, role, th),
                "spaces": list(self.requested),
                "register": [{"space": s, "name": n} for s, n in self.requested.items()],
            },
        }

    def accept(
        self, peer: PeerHello, auth: dict[str, Any], th: bytes, role: bytes
    ) -> frozenset[str]:
        hub = auth.get("hub")
        if not isinstance(hub, dict):
            raise PeerProtocolError(messages.UNAUTHORIZED, "the peer at this URL is not a hub")
        statuses = hub.get("spaces")
        if not isinstance(statuses, dict):
            raise PeerProtocolError(messages.PROTOCOL_ERROR, "auth.hub.spaces must be a map")
        self.statuses = {
            s: str(v)[: messages.MAX_REASON]
            for s, v in statuses.items()
            if isinstance(s, str) and s in self.requested
        }
        user, limits = hub.get("user"), hub.get("limits")
        self.user = user if isinstance(user, str) else None
        self.limits = limits if isinstance(limits, dict) else {}
        self.accepted = frozenset(s for s, v in self.statuses.items() if v in ("ok", "registered"))
        if not self.accepted:
            raise PeerProtocolError(messages.FORBIDDEN, "the hub accepted none of the spaces")
        return self.accepted

    def spaces(self) -> frozenset[str]:
        return self.accepted


# -- one hub -------------------------------------------------------------------------------------


class HubDialer:
    """The dial loop and the state of one hub URL (all on the trio thread); `link` is the `Link`
    of its live connection, if any."""

    def __init__(self, service: HubLinkService, target: HubUrl, token: str) -> None:
        self.service = service
        self.target = target
        self.token = token
        self.state = DISCONNECTED
        self.reason: str | None = None
        self.detail = ""
        self.versions: dict[str, Any] | None = None
        self.since = time.time()
        self.device: str | None = None
        self.name: str | None = None
        self.auth: HubClientAuth | None = None
        self.statuses: dict[str, str] = {}
        self.errors: dict[str, DocError] = {}
        self.synced = False
        self.link: Link | None = None
        self.requested: frozenset[str] = frozenset()
        self.backoff: Backoff = service.config.new_backoff(service.rng)
        self.wake = trio.Event()
        self.scope: trio.CancelScope | None = None
        self._emitted: tuple[str, str | None] | None = None
        self.attempt = 0
        """Connection attempts so far; `space.hub` waits for one started after its change."""
        self.generation = 0
        """Bumped by `restart`: an attempt started before it must not settle the new settings."""
        self.outcome: dict[str, Any] | None = None
        """The first answer of the latest attempt that got one (see `settle`)."""
        self._settled = trio.Event()

    @property
    def url(self) -> str:
        return self.target.url

    @property
    def origin(self) -> str:
        return f"hub:{self.url}"

    # -- control -------------------------------------------------------------------------------

    def restart(self) -> None:
        """Redial at once (attachments, token or key changed): close the live link, if any."""
        self.generation += 1
        self.backoff.reset()
        if self.link is not None and self.link.closed is None:
            self.link.close(messages.SHUTDOWN, "the attached spaces changed")
        self.wake.set()

    def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def local_update(self, doc: str, update: bytes, origin: str) -> None:
        if self.link is not None:
            self.link.local_update(doc, update, origin)

    def docs_changed(self) -> None:
        if self.service.requested(self.url) != self.requested and self.state != IDLE:
            self.restart()  # a space was left or (re)joined: ask the hub for the new set
        elif self.state == IDLE and self.service.requested(self.url):
            self.wake.set()
        elif self.link is not None:
            self.link.docs_changed()
            self._awareness_opened(self.link)

    def send_awareness(self, doc: str, payload: bytes, exclude: str | None, to: str | None) -> None:
        """Presence to the hub (docs/presence.md), unless it came from this very link."""
        link = self.link
        if link is None or link.closed is not None:
            return
        source = link.awareness_source
        if source != exclude and (to is None or to == source):
            link.send_awareness(doc, payload)

    def _awareness_opened(self, link: Link) -> None:
        awareness = self.service.awareness
        conn = link.conn
        if awareness is not None and conn is not None and conn.established and not link.closed:
            awareness.awareness_opened(
                link.awareness_source, self.service.spaces.docs_of(conn.spaces)
            )

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        with trio.CancelScope() as scope:
            self.scope = scope
            while True:
                self.wake = trio.Event()
                spaces = self.service.requested(self.url)
                if not spaces:
                    self._set(IDLE, None)
                    await self.wake.wait()
                    continue
                await self._connect_once(spaces)
                with trio.move_on_after(self.backoff.next_delay()):
                    await self.wake.wait()

    async def _connect_once(self, spaces: frozenset[str]) -> None:
        service = self.service
        names = {s: service.space_name(s) for s in sorted(spaces)}
        self.attempt += 1
        attempt, generation = self.attempt, self.generation
        auth = HubClientAuth(
            self.token,
            names,
            service.pinned(self.url),
            # a verified TLS certificate authenticates the hub (`dial` checks it)
            trust_first_use=self.target.tls or service.trusts_first_use(self.url),
        )

        def make_conn(now: float) -> PeerConnection:
            return PeerConnection(
                service.identity,
                service.spaces,
                dialer=True,
                now=now,
                config=service.config.session,
                model=service.model,
                auth=auth,
                origin=self.origin,
            )

        def on_event(link: Link, event: Event) -> None:
            self._on_event(link, event, generation)

        link = Link(
            make_conn,
            dialer=True,
            address=self.url,
            on_event=on_event,
            config=service.config,
            host=service.spaces,
        )
        self.link, self.auth, self.requested = link, auth, spaces
        self.synced = False
        self._set(CONNECTING, self.reason)
        try:
            await dial(link, self.target)
        except Unreachable as exc:
            log.debug("hub %s unreachable: %s", self.url, exc)
            self.detail, self.versions = str(exc), None
            self._set(DISCONNECTED, exc.reason)  # `unreachable`, or `busy` (503 from the hub)
        except Exception as exc:
            log.exception("hub %s: the link failed", self.url)
            self.detail, self.versions = f"{type(exc).__name__}: {exc}", None
            self._set(DISCONNECTED, messages.INTERNAL_ERROR)
        finally:
            self.link = None
            if self.state != DISCONNECTED:  # cancelled, or ended without a Closed event
                self._set(DISCONNECTED, self.reason or messages.CLOSED)
            if attempt == self.attempt and generation == self.generation:
                self.settle(attempt)  # no-op if the hub's acceptance settled it already

    def settle(self, attempt: int) -> None:
        """Record the first answer of `attempt` (accepted, or why not) for `space.hub`'s wait."""
        if self.outcome is not None and self.outcome["attempt"] >= attempt:
            return
        self.outcome = {
            "attempt": attempt,
            "state": self.state,
            "reason": self.reason,
            "detail": self.describe() if self.state != CONNECTED else "",
            "spaces": dict(self.statuses) if self.state == CONNECTED else {},
            "user": self.auth.user if self.auth is not None and self.state == CONNECTED else None,
        }
        self._settled.set()
        self._settled = trio.Event()

    async def wait_settled(self, after: int, timeout: float) -> dict[str, Any] | None:
        """The outcome of the first attempt numbered above `after`; None after `timeout`."""
        with trio.move_on_after(timeout):
            while self.outcome is None or self.outcome["attempt"] <= after:
                await self._settled.wait()
            return self.outcome
        return None

    def _on_event(self, link: Link, event: Event, generation: int) -> None:
        if isinstance(event, HelloReceived):
            pass  # the hub's claims: shown only once its key is proven (below)
        elif isinstance(event, Established):
            auth = self.auth
            assert auth is not None
            if (
                self.service.requested(self.url) != self.requested
                or auth.token != self.token
                or generation != self.generation
            ):
                link.close(messages.SHUTDOWN, "the attachment changed while connecting")
                return  # attached, detached or re-keyed meanwhile: redial at once
            self.device, self.name = event.device, event.name
            if auth.pinned is None:
                self.service.pin(self.url, event.device)  # trust on first use, as allowed
            self.statuses = dict(auth.statuses)
            self.errors = {}
            self.detail, self.versions = "", None
            log.info(
                "hub %s: connected as user %s; spaces %s",
                self.url,
                auth.user,
                ", ".join(f"{s} {v}" for s, v in sorted(self.statuses.items())),
            )
            self._set(CONNECTED, None)
            self.settle(self.attempt)
            self._awareness_opened(link)
        elif isinstance(event, AwarenessReceived):
            if self.service.awareness is not None:
                self.service.awareness.awareness_received(
                    link.awareness_source, event.doc, event.payload
                )
        elif isinstance(event, Synced):
            self.synced = True
            self.backoff.reset()
        elif isinstance(event, DocError):
            self.errors[event.doc] = event
            log.warning("hub %s refused %s: %s %s", self.url, event.doc, event.reason, event.detail)
            self.service.emit(
                "hub-limit",
                url=self.url,
                doc=event.doc,
                space=self.service.spaces.env_space(event.doc),
                reason=event.reason,
                detail=event.detail,
            )
        elif isinstance(event, DocFailed):  # that environment's error here; the link goes on
            origin = f"hub:{self.url}"
            self.service.emit(
                "environment-error",
                id=event.doc,
                origin=origin,
                follower=origin,
                reason=event.reason,
            )
        elif isinstance(event, Closed):
            awareness = self.service.awareness
            if awareness is not None and link.conn is not None and link.conn.established:
                awareness.awareness_closed(link.awareness_source)
            self.detail, self.versions = event.detail, event.versions
            if (
                event.reason == messages.FORBIDDEN
                and self.auth is not None
                and not self.auth.statuses
            ):
                self.statuses = dict.fromkeys(self.auth.requested, messages.FORBIDDEN)
            if event.reason == messages.SHUTDOWN and not event.by_peer:
                reason: str = messages.CLOSED  # we closed it to redial
            else:
                reason = event.reason
            if event.reason != messages.SHUTDOWN or event.by_peer:
                log.info("hub %s: link closed: %s %s", self.url, event.reason, event.detail)
            self._set(DISCONNECTED, reason)

    def _set(self, state: str, reason: str | None) -> None:
        """Change state; emit `hub-connected` / `hub-disconnected` when it means something."""
        if state != self.state:
            self.since = time.time()
        self.state, self.reason = state, reason
        if state in (CONNECTING, IDLE) or self._emitted == (state, reason):
            return
        self._emitted = (state, reason)
        if state == CONNECTED:
            self.service.emit(
                "hub-connected",
                url=self.url,
                device=self.device,
                name=self.name,
                spaces=dict(self.statuses),
            )
        else:
            self.service.emit(
                "hub-disconnected",
                url=self.url,
                reason=reason,
                detail=self.describe(),
                versions=self.versions,
            )

    # -- reports -------------------------------------------------------------------------------

    def live_errors(self) -> list[DocError]:
        """Refusals of the live session (a retried document drops out once the hub takes it),
        else of the last one."""
        conn = self.link.conn if self.link is not None else None
        if conn is not None and conn.session is not None and conn.closed is None:
            return list(conn.session.refused.values())
        return list(self.errors.values())

    def describe(self) -> str:
        """The detail to show: for a version mismatch, which versions the hub needs."""
        if self.reason == messages.INCOMPATIBLE_VERSION and self.versions:
            remote = self.versions.get("remote") or {}
            local = self.versions.get("local") or {}
            newer = (remote.get("proto") or 0, remote.get("model") or 0) > (
                local.get("proto") or 0,
                local.get("model") or 0,
            )
            advice = "upgrade peerdaemon" if newer else "the hub needs an upgrade"
            return (
                f"the hub needs protocol {remote.get('proto')} model {remote.get('model')}; "
                f"this daemon speaks protocol {local.get('proto')} model {local.get('model')} "
                f"({advice})"
            )
        return self.detail

    def shown_reason(self) -> str | None:
        """The reason for `status` and `peers`: the link's, or while connected, a limit or a
        forbidden space (the link is up, but not everything syncs)."""
        if self.state != CONNECTED:
            return self.reason
        errors = self.live_errors()
        if errors:
            return errors[0].reason
        if any(v == messages.FORBIDDEN for v in self.statuses.values()):
            return messages.FORBIDDEN
        return None

    def space_statuses(self) -> dict[str, str]:
        held = self.service.spaces.spaces
        out = {}
        for space in self.service.attached_spaces(self.url):
            if space not in held:
                out[space] = "left"
            else:
                out[space] = self.statuses.get(space, PENDING)
        return out

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url,
            "state": self.state,
            "reason": self.shown_reason(),
            "detail": self.describe() if self.state != CONNECTED else "",
            "since": self.since,
            "device": self.device,
            "name": self.name,
            "hub_key": self.service.pinned(self.url),
            "user": self.auth.user if self.auth is not None and self.state == CONNECTED else None,
            "spaces": self.space_statuses(),
            "synced": self.synced and self.state == CONNECTED,
            "errors": [
                {
                    "doc": e.doc,
                    "space": self.service.spaces.env_space(e.doc),
                    "reason": e.reason,
                    "detail": e.detail,
                }
                for e in self.live_errors()
            ],
        }
        if self.state == DISCONNECTED and self.versions is not None:
            out["versions"] = self.versions
        if self.auth is not None and self.auth.limits:
            out["limits"] = dict(self.auth.limits)
        return out

    def row(self) -> dict[str, Any]:
        """A line of `peerdaemon peers`, shaped like the LAN's rows."""
        reason = self.shown_reason()
        row: dict[str, Any] = {
            "kind": "hub",
            "device": self.device,
            "name": self.name or "hub",
            "address": self.url,
            "state": self.state,
            "reason": reason,
            "since": self.since,
        }
        if self.state == DISCONNECTED and self.versions is not None:
            row["versions"] = self.versions
        detail = self.describe() if self.state != CONNECTED else ""
        errors = self.live_errors() if self.state == CONNECTED else []
        if errors:
            detail = "; ".join(f"{e.doc}: {e.reason}" for e in errors)
        if detail:
            row["detail"] = detail
        if self.state == CONNECTED:
            link = self.link
            row["spaces"] = sum(v != messages.FORBIDDEN for v in self.statuses.values())
            row["direction"] = "outgoing"
            row["synced"] = self.synced
            if link is not None:
                row["bytes_sent"] = getattr(link, "bytes_sent", 0)
                row["bytes_received"] = getattr(link, "bytes_received", 0)
        return row


# -- the service ---------------------------------------------------------------------------------


class HubLinkService:
    """Every hub this daemon is attached to. `run` is started with `nursery.start`."""

    def __init__(
        self,
        identity: Identity,
        spaces: SpacesService,
        store: Store,
        events: EventLog,
        *,
        config: PeerConfig | None = None,
        model: int = MODEL_VERSION,
        rng: random.Random | None = None,
        awareness: AwarenessHost | None = None,
    ) -> None:
        self.identity = identity
        self.awareness = awareness
        """Presence (docs/presence.md), carried over the hub links too."""
        self.spaces = spaces
        self.store = store
        self.events = events
        self.config = config or PeerConfig()
        self.model = model
        self.rng = rng or random.Random()
        self.attached: dict[str, dict[str, Any]] = {}
        """url -> {"token": str, "spaces": [space id], "device": the trusted hub key?,
        "trust_first_use": True?}, as in the store setting."""
        self.dialers: dict[str, HubDialer] = {}
        self._nursery: trio.Nursery | None = None

    # -- settings ------------------------------------------------------------------------------

    def load(self) -> None:
        saved = self.store.get_setting(HUBS_SETTING, {}) or {}
        for url, entry in saved.items() if isinstance(saved, dict) else ():
            try:
                target = parse_hub_url(url)
            except ValueError:
                log.warning("hub: ignoring a saved attachment with a bad URL %r", url)
                continue
            token, spaces = entry.get("token"), entry.get("spaces")
            if not isinstance(token, str) or not isinstance(spaces, list):
                log.warning("hub: ignoring a malformed saved attachment to %s", target.url)
                continue
            self.attached[target.url] = {"token": token, "spaces": [str(s) for s in spaces]}
            device = entry.get("device")
            if isinstance(device, str) and device:
                self.attached[target.url]["device"] = device
            elif entry.get("trust_first_use") is True:
                self.attached[target.url]["trust_first_use"] = True
            self.dialers[target.url] = HubDialer(self, target, token)
        self._mark_spaces()

    def _save(self) -> Ticket:
        return self.store.put_setting(HUBS_SETTING, self.attached)

    def _mark_spaces(self) -> None:
        """Let invites of an attached space carry its hub URL and, once this daemon trusts one,
        the hub's key (`Space.hub`, `Space.hub_key`)."""
        for url, entry in self.attached.items():
            for space_id in entry["spaces"]:
                space = self.spaces.spaces.get(space_id)
                if space is not None:
                    if space.hub != url:
                        space.hub, space.hub_key = url, None
                    if entry.get("device"):
                        space.hub_key = entry["device"]

    # -- queries -------------------------------------------------------------------------------

    def attached_spaces(self, url: str) -> list[str]:
        entry = self.attached.get(url)
        return list(entry["spaces"]) if entry is not None else []

    def requested(self, url: str) -> frozenset[str]:
        """The attached spaces this device still holds: what a connection to `url` asks for."""
        return frozenset(s for s in self.attached_spaces(url) if s in self.spaces.spaces)

    def pinned(self, url: str) -> str | None:
        """The hub device id trusted for `url` (None until the first successful connection)."""
        entry = self.attached.get(url)
        device = entry.get("device") if entry is not None else None
        return device if isinstance(device, str) else None

    def trusts_first_use(self, url: str) -> bool:
        """Whether the user allowed trusting the key an unpinned hub at `url` shows first."""
        entry = self.attached.get(url)
        return entry is not None and entry.get("trust_first_use") is True

    def pin(self, url: str, device: str) -> None:
        """Trust `device` as the hub at `url` from now on (its first successful connection)."""
        entry = self.attached.get(url)
        if entry is None or entry.get("device") == device:
            return
        entry["device"] = device
        entry.pop("trust_first_use", None)
        self._save()
        self._mark_spaces()
        log.info("hub %s: pinned the hub's device id %s", url, device)

    def hub_of(self, space_id: str) -> str | None:
        for url, entry in self.attached.items():
            if space_id in entry["spaces"]:
                return url
        return None

    def space_name(self, space_id: str) -> str:
        space = self.spaces.spaces.get(space_id)
        return space.display_name if space is not None else ""

    def emit(self, kind: str, **data: Any) -> None:
        try:
            self.events.emit(kind, **data)
        except Exception:
            log.exception("emitting %s failed", kind)

    # -- attach / detach -----------------------------------------------------------------------

    def attach(
        self,
        ref: str,
        url: str | None,
        token: str,
        *,
        hub_key: str | None = None,
        trust_first_use: bool = False,
    ) -> tuple[str, str, Ticket]:
        """Attach a space to a hub (the URL defaults to the one its invite carried).

        Which hub key is trusted for the URL: `hub_key` if given (it replaces any pin); with
        `trust_first_use`, none, and the key the hub shows on the next connection is pinned;
        otherwise the one already pinned, or else the key the space's invite carried for this
        URL. Without any, only a `wss://` connection (its verified certificate) may pin one."""
        space = self.spaces.resolve(ref)
        if url is None or url == "":
            url = space.hub
            if not url:
                raise SpaceError(
                    BAD_REQUEST, "give the hub's URL (this space's invite carried none)"
                )
        try:
            target = parse_hub_url(url)
        except ValueError as exc:
            raise SpaceError(BAD_REQUEST, str(exc)) from None
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN or token != token.strip():
            raise SpaceError(BAD_REQUEST, "the token must be a non-empty string without spaces")
        vouched: str | None = None  # the key the space's invite carried for this URL
        if hub_key is not None:
            if trust_first_use:
                raise SpaceError(BAD_REQUEST, "give a hub key or trust the first one, not both")
            try:
                hub_key = normalize_hub_key(hub_key)
            except ValueError as exc:
                raise SpaceError(BAD_REQUEST, str(exc)) from None
        elif space.hub_key and space.hub:
            try:
                if parse_hub_url(space.hub).url == target.url:
                    vouched = space.hub_key
            except ValueError:
                pass
        restart: set[str] = set()
        previous = self.hub_of(space.id)
        if previous is not None and previous != target.url:
            self._remove(space.id, previous)
            restart.add(previous)
        entry = self.attached.setdefault(target.url, {"token": token, "spaces": []})
        before = dict(entry, spaces=list(entry["spaces"]))
        if trust_first_use:
            entry.pop("device", None)  # trust the key the hub shows next
            entry["trust_first_use"] = True
        elif hub_key is not None or (vouched is not None and not entry.get("device")):
            entry["device"] = hub_key or vouched
            entry.pop("trust_first_use", None)
        entry["token"] = token
        if space.id not in entry["spaces"]:
            entry["spaces"].append(space.id)
        dialer = self.dialers.get(target.url)
        if entry != before or dialer is None or dialer.state != CONNECTED:
            restart.add(target.url)  # a change, or an attach to try again now: redial
        ticket = self._save()
        self._mark_spaces()
        if dialer is None:
            dialer = self.dialers[target.url] = HubDialer(self, target, token)
            if self._nursery is not None:
                self._nursery.start_soon(dialer.run)
        dialer.token = token
        for url_ in restart:
            if url_ in self.dialers:
                self.dialers[url_].restart()
        log.info("hub: space %s attached to %s", space.id, target.url)
        return space.id, target.url, ticket

    def detach(self, ref: str) -> tuple[str, str, Ticket]:
        space_id = self._space_id(ref)
        url = self.hub_of(space_id)
        if url is None:
            raise SpaceError(NOT_FOUND, f"space {ref!r} is not attached to a hub")
        self._remove(space_id, url)
        ticket = self._save()
        space = self.spaces.spaces.get(space_id)
        if space is not None and space.hub == url:
            space.hub = None
        if url in self.dialers:
            self.dialers[url].restart()
        log.info("hub: space %s detached from %s", space_id, url)
        return space_id, url, ticket

    def _space_id(self, ref: str) -> str:
        """A held space (by id, name or prefix), or an attached id of a space since left."""
        try:
            return self.spaces.resolve(ref).id
        except SpaceError:
            if any(ref in e["spaces"] for e in self.attached.values()):
                return ref
            raise

    def _remove(self, space_id: str, url: str) -> None:
        entry = self.attached.get(url)
        if entry is None:
            return
        entry["spaces"] = [s for s in entry["spaces"] if s != space_id]
        if not entry["spaces"]:
            del self.attached[url]
            dialer = self.dialers.pop(url, None)
            if dialer is not None:
                if dialer.link is not None and dialer.link.closed is None:
                    dialer.link.close(messages.SHUTDOWN, "detached")
                dialer.stop()

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial every attached hub until cancelled."""
        change = self.spaces.add_listener(self._on_local_change)
        docs = self.spaces.add_docs_listener(self._on_docs_changed)
        awareness = self.awareness
        presence = awareness.add_awareness_listener(self._on_awareness) if awareness else None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for dialer in self.dialers.values():
                    nursery.start_soon(dialer.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.spaces.remove_listener(change)
            self.spaces.remove_docs_listener(docs)
            if awareness is not None and presence is not None:
                awareness.remove_awareness_listener(presence)

    def _on_awareness(self, doc: str, payload: bytes, exclude: str | None, to: str | None) -> None:
        for dialer in list(self.dialers.values()):
            dialer.send_awareness(doc, payload, exclude, to)

    def _on_local_change(self, doc: str, update: bytes, origin: str) -> None:
        for dialer in list(self.dialers.values()):
            dialer.local_update(doc, update, origin)

    def _on_docs_changed(self) -> None:
        self._mark_spaces()
        for dialer in list(self.dialers.values()):
            dialer.docs_changed()

    # -- reports -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `hub` section of `status` (never the token)."""
        return {"hub": [self.dialers[url].status() for url in sorted(self.dialers)]}

    def rows(self) -> list[dict[str, Any]]:
        return [self.dialers[url].row() for url in sorted(self.dialers)]

    def peers_op(
        self, lan: Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]] | None
    ) -> Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]]:
        """The `peers` operation: the LAN's rows, then one row per hub."""

        async def op_peers(args: dict[str, Any], session: Any) -> dict[str, Any]:
            if lan is not None:
                result = dict(await lan(args, session))
            else:
                result = {"device": self.identity.device_id, "name": self.identity.name}
            result["peers"] = list(result.get("peers", [])) + self.rows()
            return result

        return op_peers

    # -- socket operations ---------------------------------------------------------------------

    def register(self, service: Any) -> None:
        """Add `space.hub` / `space.unhub` and the `hub` section of `status`."""
        service.register("space.hub", self.op_hub)
        service.register("space.unhub", self.op_unhub)
        service.status_hooks.append(self.status)

    async def op_hub(self, args: dict[str, Any], session: Any) -> Any:
        space, url, token = args.get("space"), args.get("url"), args.get("token")
        hub_key, tofu, wait = (
            args.get("hub_key"),
            args.get("trust_first_use", False),
            args.get("wait", 0),
        )
        if not isinstance(space, str) or not space:
            raise OpError(BAD_REQUEST, "argument 'space' must be a non-empty string")
        if url is not None and not isinstance(url, str):
            raise OpError(BAD_REQUEST, "argument 'url' must be a string")
        if not isinstance(token, str):
            raise OpError(BAD_REQUEST, "argument 'token' must be a string")
        if hub_key is not None and not isinstance(hub_key, str):
            raise OpError(BAD_REQUEST, "argument 'hub_key' must be a string")
        if not isinstance(tofu, bool):
            raise OpError(BAD_REQUEST, "argument 'trust_first_use' must be a boolean")
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= MAX_WAIT:
            raise OpError(BAD_REQUEST, f"argument 'wait' must be 0 to {MAX_WAIT:g} seconds")
        generations = {u: dialer.generation for u, dialer in self.dialers.items()}
        # a SpaceError is an OpError: the socket answers it as it is
        space_id, canonical, ticket = self.attach(
            space, url, token, hub_key=hub_key, trust_first_use=tofu
        )
        result: dict[str, Any] = {"space": space_id, "url": canonical}
        if not wait:
            return Pending(ticket.wait, result)
        dialer = self.dialers[canonical]
        baseline = dialer.attempt  # the next attempt is the first with the new settings
        redialed = generations.get(canonical) != dialer.generation

        async def answer() -> None:
            await ticket.wait()
            if redialed:
                outcome = await dialer.wait_settled(baseline, float(wait))
            else:  # already connected with these settings: that is the answer
                outcome = dialer.outcome
            result.update(self._answer(dialer, space_id, outcome))

        return Pending(answer, result)

    def _answer(
        self, dialer: HubDialer, space_id: str, outcome: dict[str, Any] | None
    ) -> dict[str, Any]:
        """`space.hub`'s report of the hub's first answer: `accepted` (the hub syncs the space),
        `refused` (`reason`: unauthorized, forbidden, hub-key-unknown, unreachable, busy...) or
        `no-answer` (none within `wait`). The attachment is kept in every case."""
        key = self.pinned(dialer.url)
        if outcome is None:
            return {
                "outcome": "no-answer",
                "reason": dialer.reason,
                "detail": dialer.describe() if dialer.state != CONNECTED else "",
                "hub_key": key,
            }
        status = outcome["spaces"].get(space_id) if outcome["state"] == CONNECTED else None
        if status in ACCEPTED:
            return {
                "outcome": "accepted",
                "status": status,
                "user": outcome["user"],
                "hub_key": key,
            }
        reason = outcome["reason"] or status or messages.CLOSED
        detail = outcome["detail"]
        if outcome["state"] == CONNECTED:
            reason, detail = status or PENDING, f"the hub answered {status!r} for this space"
        return {"outcome": "refused", "reason": reason, "detail": detail, "hub_key": key}

    async def op_unhub(self, args: dict[str, Any], session: Any) -> Any:
        space = args.get("space")
        if not isinstance(space, str) or not space:
            raise OpError(BAD_REQUEST, "argument 'space' must be a non-empty string")
        space_id, url, ticket = self.detach(space)
        return Pending(ticket.wait, {"space": space_id, "url": url})
