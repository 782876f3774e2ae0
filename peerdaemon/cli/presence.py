"""`peerdaemon presence [SPACE] [--json]`: who is connected to each space and who edits which
environment (docs/presence.md), from the socket's `presence.list`."""

from __future__ import annotations

import argparse
from typing import Any

from peerdaemon.cli.common import Commands, call, cell, print_table, to_json

__all__ = ["editor_label", "editors_by_env", "register"]


def register(commands: Commands) -> None:
    p = commands.command(
        "presence",
        cmd_presence,
        "who is connected to each space, and who edits which environment",
        example="peerdaemon presence Team --json",
    )
    p.add_argument("space", nargs="?", metavar="SPACE", help="one space (its id or name)")
    p.add_argument("--json", action="store_true", help="print the presence as JSON")


def editor_label(client: dict[str, Any]) -> str:
    """`Ada (laptop)`, `me`, or a web editor's name."""
    user = client.get("user") or client.get("device_name") or f"client {client.get('client')}"
    device = client.get("device_name")
    label = f"{user} ({device})" if device and device != user else str(user)
    return f"{label} [me]" if client.get("self") else label


def _what(client: dict[str, Any]) -> str:
    """What an editor edits: `route 1234/endpoint`, `saved (file)`..."""
    parts = []
    for item in client.get("editing") or ():
        if not isinstance(item, dict):
            continue
        via = item.get("via")
        if via == "editor":
            where = "/".join(str(item[k]) for k in ("entity", "field") if item.get(k))
            parts.append(where or "editing")
        else:
            parts.append(f"saved ({via})")
    return ", ".join(parts) or "open"


def _selects(client: dict[str, Any]) -> bool:
    return any(
        isinstance(e, dict) and e.get("via") == "editor" for e in client.get("editing") or ()
    )


def editors_by_env(listing: Any) -> dict[str, list[dict[str, Any]]]:
    """env id -> its editors, from a `presence.list` answer (for `env list`): everyone else,
    and this device only where an editor here says so (its own saves are no news to it)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for space in (listing or {}).get("spaces") or ():
        for env in space.get("environments") or ():
            editors = [e for e in env.get("editors") or () if not e.get("self") or _selects(e)]
            if editors:
                out.setdefault(str(env.get("id")), []).extend(editors)
    return out


def cmd_presence(args: argparse.Namespace) -> int:
    listing = call(args, "presence.list", space=args.space)
    if args.json:
        print(to_json(listing))
        return 0
    spaces = listing.get("spaces") or []
    if not spaces:
        print("no spaces: presence is shared with the members of a space")
        return 0
    for i, space in enumerate(spaces):
        if i:
            print()
        title = space.get("name") or space.get("space") or "environments in no space"
        connected = space.get("connected") or []
        via = {c["client"]: "/".join(c.get("via") or ()) for c in connected}
        print(f"{title}: {len(connected)} connected")
        if connected:
            print_table(
                [("WHO", "DEVICE", "VIA", "COLOR")]
                + [
                    (
                        editor_label(c),
                        cell(c.get("device")),
                        cell(via.get(c["client"])),
                        cell(c.get("color")),
                    )
                    for c in connected
                ]
            )
        rows = [("ENVIRONMENT", "WHO", "EDITS")]
        for env in space.get("environments") or ():
            for editor in env.get("editors") or ():
                rows.append(
                    (cell(env.get("name") or env.get("id")), editor_label(editor), _what(editor))
                )
        if len(rows) > 1:
            print_table(rows)
        else:
            print("nobody edits an environment")
    return 0
