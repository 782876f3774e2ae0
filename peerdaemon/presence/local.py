"""What this device says about itself, without I/O: who it is and what its editors edit.

`Editors` holds each socket connection's selections (one per environment and connection: a
connection that closes clears only its own) and the environments saved here lately (a linked
file or a socket write marks an environment as edited by this device for `SAVE_WINDOW`
seconds). `Me.state` turns that into the awareness state of a document (docs/presence.md).
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["APP", "MAX_FIELD", "SAVE_WINDOW", "Editors", "Me", "Selection", "colour_of"]

APP = "peerdaemon"
SAVE_WINDOW = 10.0
"""How long a local save marks an environment as edited by this device."""
MAX_FIELD = 512
"""Longest entity uuid or field name an editor may name."""


def colour_of(device_id: str) -> str:
    """A stable colour for a device (`#rrggbb`): its hue from the device id's hash, saturation
    and lightness fixed so that every device's colour reads on light and dark backgrounds."""
    digest = hashlib.sha256(device_id.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    r, g, b = colorsys.hls_to_rgb(hue, 0.45, 0.65)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


@dataclass(frozen=True, slots=True)
class Selection:
    """What one editor (a socket connection) edits in one environment."""

    entity: str | None = None
    field: str | None = None

    def as_dict(self, via: str) -> dict[str, Any]:
        out: dict[str, Any] = {"via": via}
        if self.entity is not None:
            out["entity"] = self.entity
        if self.field is not None:
            out["field"] = self.field
        return out


@dataclass
class Me:
    """This device: its id, name and the user's display name (`config set display_name`)."""

    device_id: str
    device_name: str
    display_name: str | None = None

    @property
    def colour(self) -> str:
        return colour_of(self.device_id)

    def state(self, editing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The awareness state: `user` as y-websocket editors read it (name, color), the device,
        and (on an environment's document) what is edited."""
        out: dict[str, Any] = {
            "user": {"name": self.display_name or self.device_name, "color": self.colour},
            "device": {"id": self.device_id, "name": self.device_name},
            "app": APP,
        }
        if self.display_name:
            out["user"]["display_name"] = self.display_name
        if editing is not None:
            out["editing"] = editing
        return out


@dataclass
class Editors:
    """Selections per connection and environment, and recent saves."""

    window: float = SAVE_WINDOW
    selections: dict[str, dict[int, Selection]] = field(default_factory=dict)
    saves: dict[str, tuple[float, str]] = field(default_factory=dict)  # env -> (until, via)

    def set(self, conn: int, env: str, selection: Selection) -> bool:
        """Connection `conn` edits `selection` of `env`; -> whether anything changed."""
        current = self.selections.setdefault(env, {})
        if current.get(conn) == selection:
            return False
        current[conn] = selection
        return True

    def clear(self, conn: int, env: str | None = None) -> set[str]:
        """Connection `conn` edits nothing in `env` (None: anywhere); -> environments changed."""
        changed = set()
        for e in [env] if env is not None else list(self.selections):
            conns = self.selections.get(e)
            if conns is not None and conns.pop(conn, None) is not None:
                changed.add(e)
                if not conns:
                    del self.selections[e]
        return changed

    def saved(self, env: str, via: str, now: float) -> bool:
        """A save through `via` (`file`, `socket`): -> whether `env` was not marked already."""
        fresh = env not in self.saves or self.saves[env][1] != via
        self.saves[env] = (now + self.window, via)
        return fresh

    def expire(self, now: float) -> set[str]:
        """Forget saves older than the window; -> environments changed."""
        done = {env for env, (until, _) in self.saves.items() if until <= now}
        for env in done:
            del self.saves[env]
        return done

    def next_deadline(self) -> float | None:
        until = min((u for u, _ in self.saves.values()), default=math.inf)
        return None if until == math.inf else until

    def envs(self) -> set[str]:
        return set(self.selections) | set(self.saves)

    def editing(self, env: str) -> list[dict[str, Any]]:
        """What this device edits in `env`: each distinct selection once, then a recent save."""
        out: list[dict[str, Any]] = []
        seen: set[Selection] = set()
        for conn in sorted(self.selections.get(env, {})):
            selection = self.selections[env][conn]
            if selection not in seen:
                seen.add(selection)
                out.append(selection.as_dict("editor"))
        save = self.saves.get(env)
        if save is not None:
            out.append({"via": save[1]})
        return out
