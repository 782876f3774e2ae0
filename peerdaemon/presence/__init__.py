"""Presence (docs/presence.md): who is connected to each space and who edits what, carried as
y-protocols awareness over the LAN links and the hub. The package's public face.

`core.Awareness` is the sans-I/O core (states, clocks, time-outs, what to send, what changed);
`local` says what this device publishes (its identity, its editors' selections, recent saves);
`service.PresenceService` is the trio shell and the `presence.*` socket operations.
"""

from __future__ import annotations

from .core import MAX_STATE, RENEW, TIMEOUT, Awareness, Change, Send, StateTooLarge
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
