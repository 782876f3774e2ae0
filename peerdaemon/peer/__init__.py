"""Daemon-to-daemon sync (docs/peer-protocol.md): the package's public face.

Import from here, not from the modules. Loading the face loads the sans-I/O core only (no trio):
`messages` (the wire vocabulary: CBOR schema, close reasons, limits), the handshake's results,
`PeerConnection` (handshake + Yjs sync session + keep-alive + slow-peer rules, driven by
messages and `now`) with its events, `apply_update` (what every shell does with an
`UpdateReceived`), the hub-mode token proofs, `Backoff` and `PeerConfig`. The hub and the hub
link drive the same core over their own websockets.

The trio shell (`Link`, `dial`, `serve`, `PeerManager`, `Unreachable`, `PATH`...) is reachable
from here too, but loaded only when first asked for (a module `__getattr__`), so the sans-I/O
parts and their tests never import trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.admission import BUSY_BODY, BUSY_STATUS, Admission, Slot
from ..core.backoff import Backoff
from ..lazy import lazy_names
from . import messages
from .config import PeerConfig
from .crypto import HUB_TOKEN_ID_LEN, hub_token_hash, hub_token_id, hub_token_proof
from .handshake import (
    AuthPolicy,
    Established,
    IdentityLike,
    IncompatibleVersion,
    PeerHello,
    SpaceKeyLike,
)
from .messages import (
    PROTOCOL_VERSION,
    REASONS,
    CloseConnection,
    LocalProtocolError,
    PeerProtocolError,
)
from .session import (
    AwarenessHost,
    AwarenessReceived,
    Closed,
    DocError,
    DocFailed,
    DocRefused,
    Event,
    HelloReceived,
    PeerConnection,
    SessionConfig,
    SpaceKeyReceived,
    Synced,
    SyncHostView,
    UpdateReceived,
    UpdateSink,
    apply_update,
)

if TYPE_CHECKING:
    from .link import PATH, Link, Unreachable, dial, format_address, remote_address, serve
    from .manager import PeerManager

__all__ = [
    "BUSY_BODY",
    "BUSY_STATUS",
    "HUB_TOKEN_ID_LEN",
    "PATH",
    "PROTOCOL_VERSION",
    "REASONS",
    "Admission",
    "AuthPolicy",
    "AwarenessHost",
    "AwarenessReceived",
    "Backoff",
    "CloseConnection",
    "Closed",
    "DocError",
    "DocFailed",
    "DocRefused",
    "Established",
    "Event",
    "HelloReceived",
    "IdentityLike",
    "IncompatibleVersion",
    "Link",
    "LocalProtocolError",
    "PeerConfig",
    "PeerConnection",
    "PeerHello",
    "PeerManager",
    "PeerProtocolError",
    "SessionConfig",
    "Slot",
    "SpaceKeyLike",
    "SpaceKeyReceived",
    "SyncHostView",
    "Synced",
    "Unreachable",
    "UpdateReceived",
    "UpdateSink",
    "apply_update",
    "dial",
    "format_address",
    "hub_token_hash",
    "hub_token_id",
    "hub_token_proof",
    "messages",
    "remote_address",
    "serve",
]

_SHELL = {
    "PATH": "link",
    "Link": "link",
    "Unreachable": "link",
    "dial": "link",
    "format_address": "link",
    "remote_address": "link",
    "serve": "link",
    "PeerManager": "manager",
}
"""The trio shell's names, by module: imported on first use."""


__getattr__ = lazy_names(__name__, _SHELL, globals())
