"""Presence (docs/presence.md): who is connected to each space and who edits what, carried as
y-protocols awareness over the LAN links and the hub. The package's public face.

`core.Awareness` is the sans-I/O core (states, clocks, time-outs, what to send, what changed);
`local` says what this device publishes (its identity, its editors' selections, recent saves);
`service.PresenceService` is the trio shell and the `presence.*` socket operations.

Loading the package loads the core only (what the hub's presence bridge uses); `local` and the
service (with the registry and the document model behind it) are loaded when first asked for (a
module `__getattr__`), so a hub whose y-websocket clients send awareness does not keep them in
memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .core import MAX_STATE, RENEW, TIMEOUT, Awareness, Change, Send, StateTooLarge

if TYPE_CHECKING:
    from .local import SAVE_WINDOW, Editors, Me, Selection, colour_of
    from .service import PresenceService, SpacesView

__all__ = [
    "MAX_STATE",
    "RENEW",
    "SAVE_WINDOW",
    "TIMEOUT",
    "Awareness",
    "Change",
    "Editors",
    "Me",
    "PresenceService",
    "Selection",
    "Send",
    "SpacesView",
    "StateTooLarge",
    "colour_of",
]

_LAZY = {
    "SAVE_WINDOW": "local",
    "Editors": "local",
    "Me": "local",
    "Selection": "local",
    "colour_of": "local",
    "PresenceService": "service",
    "SpacesView": "service",
}
"""Names loaded on first use, by module."""


__getattr__ = lazy_names(__name__, _LAZY, globals())
