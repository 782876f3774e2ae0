"""The peer service's settings in one object for its callers (the supervisor, the hub, tests).

`PeerConfig` holds everything: the sans-I/O core's limits and timers (`SessionConfig`, which it
extends, so every field is set by name in one place) and what only the trio shell uses (dialing,
closing, backoff, the peers table, the listener's admission limits). The core is built with
`config.session`, its own part alone, so it cannot come to depend on a shell setting.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..core.backoff import Backoff, Uniform
from .session import SessionConfig

__all__ = ["PeerConfig"]


@dataclass(frozen=True, slots=True)
class PeerConfig(SessionConfig):
    """Limits and timers of the peer protocol; the defaults are the protocol's recommendations."""

    connect_timeout: float = 10.0
    """TCP + websocket opening handshake of a dial."""
    close_grace: float = 2.0
    """How long a closing connection may spend flushing its close message before it is cut."""
    backoff_initial: float = 0.5
    """The first redial delay (section 9); doubled after each failed dial..."""
    backoff_max: float = 60.0
    """...up to this."""
    backoff_jitter: float = 0.2
    """Each delay is multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""
    max_rows: int = 512
    """Rows of the peers table kept for devices we no longer dial or hear from."""
    max_half_open: int = 64
    """Incoming connections that have not finished the handshake, at most; more get `busy`."""
    max_half_open_per_ip: int = 8
    """The same, per remote address."""

    @property
    def session(self) -> SessionConfig:
        """The sans-I/O core's part alone: what a `PeerConnection` is built with."""
        return SessionConfig(**{f.name: getattr(self, f.name) for f in fields(SessionConfig)})

    def new_backoff(self, rng: Uniform | None = None) -> Backoff:
        """A fresh redial backoff with these settings (one per dialed address or hub)."""
        return Backoff(self.backoff_initial, self.backoff_max, self.backoff_jitter, rng)
