"""The redial delay of LAN peers and hubs (docs/peer-protocol.md section 9) and of the mock runner: exponential backoff
with jitter, as one pure object so both dial loops share the rule and tests need no clock.

Each delay is the current base times a uniform factor in [1 - jitter, 1 + jitter]; the base
starts at `initial` and doubles after every delay handed out, up to `maximum`. `reset` (a
completed sync, a joined space, changed settings) brings it back to `initial`. The jitter keeps
devices that lost the same peer at once from redialing in step.
"""

from __future__ import annotations

import random
from typing import Protocol

__all__ = ["Backoff", "Uniform"]


class Uniform(Protocol):
    """The part of `random.Random` a backoff draws from (tests pass a seeded one)."""

    def uniform(self, a: float, b: float) -> float: ...


class Backoff:
    """Delays before each redial of one address; see the module docstring for the rule."""

    __slots__ = ("_base", "initial", "jitter", "maximum", "rng")

    def __init__(
        self, initial: float, maximum: float, jitter: float, rng: Uniform | None = None
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, not {initial}, {maximum}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), not {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.rng: Uniform = rng if rng is not None else random.Random()
        self._base = initial

    @property
    def base(self) -> float:
        """The delay the next `next_delay` is drawn around."""
        return self._base

    def next_delay(self) -> float:
        """How long to wait before the next dial; the one after waits about twice as long."""
        delay = self._base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self._base = min(self._base * 2, self.maximum)
        return delay

    def reset(self) -> None:
        """Back to `initial`: the peer answered (a completed sync) or what we ask of it changed."""
        self._base = self.initial
