"""Daemon-to-daemon sync over the LAN (docs/peer-protocol.md).

Sans-I/O core: `messages` (CBOR schema), `crypto` (key schedule, boxes), `handshake`, `session`
(`PeerConnection`: handshake + Yjs sync session + keep-alive). Trio shell: `link` (one
websocket), `manager` (`PeerManager`: listener, dials, backoff, tie-break, peers table). The hub
reuses the core over its own websocket.
"""

from .handshake import Established, IncompatibleVersion, PeerHello
from .link import PATH, Link, Unreachable
from .manager import PeerManager
from .messages import PROTOCOL_VERSION, REASONS, ProtocolError
from .session import Closed, HelloReceived, PeerConfig, PeerConnection, Synced, SyncSession

__all__ = [
    "PATH",
    "PROTOCOL_VERSION",
    "REASONS",
    "Closed",
    "Established",
    "HelloReceived",
    "IncompatibleVersion",
    "Link",
    "PeerConfig",
    "PeerConnection",
    "PeerHello",
    "PeerManager",
    "ProtocolError",
    "SyncSession",
    "Synced",
    "Unreachable",
]
