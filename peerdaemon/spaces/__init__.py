"""Spaces: groups of devices sharing environments, their invites and replicated documents.

`SpacesService` keeps this device's spaces and implements `SyncHost`, the daemon side of a peer
link (docs/architecture.md, docs/spaces.md).
"""

from .document import DELETED, ENVIRONMENTS, SHARED, UNSHARED, SpaceDoc
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
