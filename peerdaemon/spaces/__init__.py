"""Spaces: groups of devices sharing environments, their invites and replicated documents.

`SpacesService` keeps this device's spaces and implements `SyncHost`, the daemon side of a peer
link (docs/architecture.md, docs/spaces.md).

Loading the package loads the space document only (what the hub reads); the invites and the
service (with the registry and the device identity's cryptography behind it) are loaded when
first asked for (a module `__getattr__`), so a hub does not keep them in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .document import DELETED, ENVIRONMENTS, SHARED, UNSHARED, SpaceDoc

if TYPE_CHECKING:
    from .invite import Invite, InviteError, decode_invite, encode_invite, parse_address
    from .service import (
        InvitePeer,
        Space,
        SpaceError,
        SpaceKey,
        SpacesService,
        SyncHost,
        space_doc_id,
    )

__all__ = [
    "DELETED",
    "ENVIRONMENTS",
    "SHARED",
    "UNSHARED",
    "Invite",
    "InviteError",
    "InvitePeer",
    "Space",
    "SpaceDoc",
    "SpaceError",
    "SpaceKey",
    "SpacesService",
    "SyncHost",
    "decode_invite",
    "encode_invite",
    "parse_address",
    "space_doc_id",
]

_LAZY = {
    "Invite": "invite",
    "InviteError": "invite",
    "decode_invite": "invite",
    "encode_invite": "invite",
    "parse_address": "invite",
    "InvitePeer": "service",
    "Space": "service",
    "SpaceError": "service",
    "SpaceKey": "service",
    "SpacesService": "service",
    "SyncHost": "service",
    "space_doc_id": "service",
}
"""Names loaded on first use, by module."""


__getattr__ = lazy_names(__name__, _LAZY, globals())
