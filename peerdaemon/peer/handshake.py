"""The peer handshake as a sans-I/O state machine (docs/peer-protocol.md, "Handshake").

    dialer                                   listener
      hello (cleartext)            ->
                                   <-        hello (cleartext)
      box(auth: sig, tags)         ->
                                   <-        box(auth: sig, tags)    or box(close unauthorized)

The listener proves nothing until the dialer has: a stranger that dials us learns our device id
and name from the hello, and nothing else (not even how many spaces we hold). Everything after
the hellos is boxed with keys from an ephemeral X25519 exchange, so an eavesdropper sees neither
tags nor documents. This module takes decoded messages and returns wire bytes; `session.py`
wraps it with framing, timers and the sync session.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..model.schema import FIRST_GATED_MODEL
from . import messages
from .crypto import (
    DIALER,
    LISTENER,
    Ephemeral,
    SecureChannel,
    auth_payload,
    derive_keys,
    space_tag,
    transcript_hash,
)
from .messages import (
    DEVICE_REMOVED,
    INCOMPATIBLE_VERSION,
    PROTOCOL_ERROR,
    PROTOCOL_VERSION,
    SELF,
    UNAUTHORIZED,
    PeerProtocolError,
)

__all__ = [
    "AuthPolicy",
    "Established",
    "Handshake",
    "IdentityLike",
    "IncompatibleVersion",
    "PeerHello",
    "SpaceKeyLike",
]


class IdentityLike(Protocol):
    """What the handshake needs of `peerdaemon.core.identity.Identity`."""

    device_id: str
    name: str
    public_key: bytes

    def sign(self, data: bytes) -> bytes: ...
    def verify(self, public_key: bytes, signature: bytes, data: bytes) -> bool: ...
    def device_id_of(self, public_key: bytes) -> str: ...


class SpaceKeyLike(Protocol):
    """One secret of a space; a space may have several (its current key epoch and older ones,
    docs/peer-protocol.md 6.1). Keys without `epoch` are epoch 0."""

    id: str
    secret: bytes


Refuse = Callable[[str, str, int], "str | None"]
"""(peer device id, space id, key epoch it proved) -> why it may not sync that space (a close
reason) or None: the host's removal and epoch rules (`SpacesService.refuse_peer`)."""


@dataclass(frozen=True)
class PeerHello:
    """The peer's claims from its hello: not yet authenticated (see `Established`)."""

    device: str
    name: str
    key: bytes
    proto: int
    model: int


@dataclass(frozen=True)
class Established:
    """The peer proved its device key and membership of `spaces` (our ids of the common spaces)."""

    device: str
    name: str
    key: bytes
    spaces: frozenset[str]
    proto: int
    model: int


class AuthPolicy(Protocol):
    """What an auth proves besides the device key, when it is not the LAN's space tags.

    Hub mode (docs/peer-protocol.md, "Hub mode") authorizes a daemon by an account token instead
    of space secrets, which a hub never holds: the daemon's policy puts a proof of its token
    (bound to this connection's transcript, like a space tag) and the spaces it wants into its
    auth, the hub's policy checks them and answers which spaces it accepted. Without a policy a
    handshake uses space tags, exactly as before.

    Both methods get the transcript hash `th` and the role byte of the auth's sender (ours for
    `auth_fields`, the peer's for `accept`), so that what an auth proves is bound to this
    connection.
    """

    def auth_fields(self, peer: PeerHello, th: bytes, role: bytes) -> dict[str, Any]:
        """Fields of our auth besides `t` and `sig` (must include `tags`, possibly empty).

        `peer` is the peer's hello (not yet authenticated); raising `PeerProtocolError` here
        closes the connection before our auth is sent (a dialer refusing a hub whose key
        changed)."""
        ...

    def accept(
        self, peer: PeerHello, auth: dict[str, Any], th: bytes, role: bytes
    ) -> frozenset[str]:
        """The peer's verified auth -> the spaces the connection syncs; raises
        `PeerProtocolError`."""
        ...

    def spaces(self) -> frozenset[str]:
        """The connection's spaces now (asked again whenever the syncable documents change)."""
        ...


class IncompatibleVersion(PeerProtocolError):
    """The peer's hello names a protocol or model version we do not speak (both are kept)."""

    def __init__(self, local: tuple[int, int], remote: tuple[int | None, int | None]) -> None:
        super().__init__(
            INCOMPATIBLE_VERSION,
            f"peer speaks protocol {remote[0]} model {remote[1]}; "
            f"we speak protocol {local[0]} model {local[1]}",
        )
        self.versions = versions_dict(local, remote)


def versions_dict(
    local: tuple[int | None, int | None], remote: tuple[int | None, int | None]
) -> dict[str, dict[str, int | None]]:
    return {
        "local": {"proto": local[0], "model": local[1]},
        "remote": {"proto": remote[0], "model": remote[1]},
    }


class Handshake:
    """One side of the handshake. Feed it the peer's hello and auth; it returns what to send.

    Raises `PeerProtocolError` (or `IncompatibleVersion`) when the connection must close; the
    caller sends the close message (boxed once `channel` exists, cleartext before).
    """

    def __init__(
        self,
        identity: IdentityLike,
        space_keys: Callable[[], Sequence[SpaceKeyLike]],
        *,
        dialer: bool,
        model: int,
        accepted_models: Iterable[int] | None = None,
        random: Callable[[int], bytes] = os.urandom,
        auth: AuthPolicy | None = None,
        refuse: Refuse | None = None,
    ) -> None:
        self.identity = identity
        self.auth = auth
        self.refuse = refuse
        self.space_keys = space_keys
        self.dialer = dialer
        self.role = DIALER if dialer else LISTENER
        self.peer_role = LISTENER if dialer else DIALER
        self.model = model
        # None: every model from the first with the space gate on (newer ones included: what a
        # space syncs between models is the spaces' decision, not the link's)
        self.accepted_models = None if accepted_models is None else frozenset(accepted_models)
        self._random = random
        self._eph = Ephemeral(random)
        self._hello: bytes | None = None
        self.state = "start"
        self.th: bytes | None = None
        self.channel: SecureChannel | None = None
        self.peer: PeerHello | None = None
        self.verified: PeerHello | None = None
        """The peer's hello once its auth signature verified: its device id and name are then
        proven (the signature covers the transcript of both hellos), even if its auth is then
        refused (no common space, a wrong token). Until then they are claims."""
        self.result: Established | None = None
        self.peer_tags: list[bytes] = []
        self.proven: dict[str, int] = {}
        """Per common space, the newest key epoch the peer's latest tags prove."""
        self.refusal: str | None = None
        """Why the last `match` dropped a space the peer proved (`device-removed` first)."""
        self.peer_takes_keys = False
        """The peer's auth says it understands `space-key` (6.1)."""

    @property
    def done(self) -> bool:
        return self.result is not None

    def _make_hello(self) -> bytes:
        return messages.encode(
            {
                "t": "hello",
                "proto": PROTOCOL_VERSION,
                "model": self.model,
                "device": self.identity.device_id,
                "name": self.identity.name[: messages.MAX_NAME],
                "key": self.identity.public_key,
                "eph": self._eph.public,
                "nonce": self._random(32),
            }
        )

    def start(self) -> list[bytes]:
        """The dialer speaks first; the listener waits for the dialer's hello."""
        if self.state != "start":
            raise RuntimeError("handshake already started")
        if not self.dialer:
            self.state = "wait-hello"
            return []
        self._hello = self._make_hello()
        self.state = "wait-hello"
        return [self._hello]

    def receive_hello(self, msg: dict[str, Any], raw: bytes) -> list[bytes]:
        """A cleartext hello (already checked to be a map with integer proto and model)."""
        if self.state != "wait-hello":
            raise PeerProtocolError(PROTOCOL_ERROR, "unexpected hello")
        proto, model = messages.versions_of(msg)
        if proto != PROTOCOL_VERSION or not self.accepts(model):
            raise IncompatibleVersion((PROTOCOL_VERSION, self.model), (proto, model))
        messages.validate_hello(msg)
        device, key = msg["device"], msg["key"]
        if self.identity.device_id_of(key) != device:
            raise PeerProtocolError(PROTOCOL_ERROR, "hello device id does not match its key")
        self.peer = PeerHello(device, msg["name"], key, proto, model)
        if device == self.identity.device_id:
            raise PeerProtocolError(SELF, "connected to ourselves")
        out: list[bytes] = []
        if self.dialer:
            assert self._hello is not None
            self.th = transcript_hash(self._hello, raw)
        else:
            self._hello = self._make_hello()
            out.append(self._hello)
            self.th = transcript_hash(raw, self._hello)
        keys = derive_keys(self._eph.exchange(msg["eph"]), self.th)
        self.channel = SecureChannel(keys, dialer=self.dialer)
        if self.dialer:
            out.append(self.channel.seal(self._auth()))
            self.state = "wait-auth"
        else:
            self.state = "wait-auth"
        return out

    def receive_auth(self, msg: dict[str, Any]) -> list[bytes]:
        """The peer's (decrypted, validated) auth: verify it; the listener answers with its own."""
        if self.state != "wait-auth":
            raise PeerProtocolError(PROTOCOL_ERROR, "unexpected auth")
        assert self.peer is not None and self.th is not None and self.channel is not None
        if not self.identity.verify(
            self.peer.key, msg["sig"], auth_payload(self.peer_role, self.th)
        ):
            raise PeerProtocolError(UNAUTHORIZED, "auth signature does not verify")
        self.verified = self.peer
        self.peer_tags = list(msg["tags"])
        self.peer_takes_keys = msg.get("keys") == 1
        if self.auth is not None:
            spaces = self.auth.accept(self.peer, msg, self.th, self.peer_role)
        else:
            spaces = self.match(self.peer_tags)
        if not spaces:
            raise PeerProtocolError(self.refusal or UNAUTHORIZED, "no common space")
        out = [] if self.dialer else [self.channel.seal(self._auth())]
        peer = self.peer
        self.result = Established(peer.device, peer.name, peer.key, spaces, peer.proto, peer.model)
        self.state = "done"
        return out

    def accepts(self, model: int) -> bool:
        if self.accepted_models is None:
            return model >= FIRST_GATED_MODEL
        return model in self.accepted_models

    # -- space tags ----------------------------------------------------------------------------

    def own_tags(self) -> list[bytes]:
        """Our tags for every space we hold now, for this connection and our role (none in hub
        mode: a hub holds no space secrets)."""
        assert self.th is not None
        if self.auth is not None:
            return []
        keys = self.space_keys()[: messages.MAX_TAGS]
        return [space_tag(k.secret, self.role, self.th) for k in keys]

    def match(self, tags: Iterable[bytes]) -> frozenset[str]:
        """Our ids of the spaces whose tag (made with the peer's role) the peer showed, for any
        key epoch we hold, less those our `refuse` rule keeps the peer out of."""
        assert self.th is not None
        shown = set(tags)
        proven: dict[str, int] = {}
        for k in self.space_keys():
            if space_tag(k.secret, self.peer_role, self.th) in shown:
                epoch = getattr(k, "epoch", 0)
                proven[k.id] = max(epoch, proven.get(k.id, epoch))
        self.proven = proven
        refused = {}
        if self.refuse is not None and self.peer is not None:
            for space, epoch in proven.items():
                if (reason := self.refuse(self.peer.device, space, epoch)) is not None:
                    refused[space] = reason
        reasons = set(refused.values())
        self.refusal = DEVICE_REMOVED if DEVICE_REMOVED in reasons else next(iter(reasons), None)
        return frozenset(proven) - frozenset(refused)

    def common_spaces(self) -> frozenset[str]:
        """The spaces the connection syncs now: from the peer's latest tags, or its auth policy."""
        if self.auth is not None:
            return self.auth.spaces()
        return self.match(self.peer_tags)

    def _auth(self) -> dict[str, Any]:
        assert self.th is not None and self.peer is not None
        if self.auth is not None:
            fields = self.auth.auth_fields(self.peer, self.th, self.role)
        else:
            fields = {"tags": self.own_tags(), "keys": 1}  # we take `space-key` (6.1)
        return {
            "t": "auth",
            "sig": self.identity.sign(auth_payload(self.role, self.th)),
            **{k: v for k, v in fields.items() if k not in ("t", "sig")},
        }
