"""`config`: the daemon's settings (docs/spaces.md, core/settings.py)."""

from __future__ import annotations

import argparse
from typing import Any

from peerdaemon.cli.common import CliError, Commands, call, print_table, to_json

# `name` is live; the others are read when the daemon starts (`run` flags win over them).
LIVE = ("name",)


def register(commands: Commands) -> None:
    configs = commands.add_group(
        "config",
        help="daemon settings",
        description="daemon settings: name (live); mirror-dir, listen, peers, mdns, "
        "mdns-interface, max-frame (used at the next start; `run` flags win)",
        dest="config_command",
        metavar="CONFIG_COMMAND",
        example="peerdaemon config list",
    )
    p = configs.command(
        "get",
        cmd_config_get,
        "print a setting (exit 1 if it is not set)",
        example="peerdaemon config get listen",
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print the value as JSON (null: not set)")
    p = configs.command(
        "set",
        cmd_config_set,
        'change a setting ("" clears it)',
        example="peerdaemon config set peers 192.168.1.20:7600,192.168.1.21:7600",
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p = configs.command(
        "list",
        cmd_config_list,
        "list every setting and its value",
        example="peerdaemon config list",
    )
    p.add_argument("--json", action="store_true", help="print the settings as JSON")


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else to_json(value, indent=None)


def cmd_config_get(args: argparse.Namespace) -> int:
    value = call(args, "config.get", key=args.key)
    if args.json:
        print(to_json(value))
        return 0
    if value is None:
        raise CliError(f"{args.key} is not set")
    print(_shown(value))
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    config = call(args, "config.get")
    if args.json:
        print(to_json(config))
        return 0
    rows = [("KEY", "VALUE", "APPLIES")]
    for key, value in (config or {}).items():
        applies = "now" if key in LIVE else "at start"
        rows.append((key, "-" if value is None else _shown(value), applies))
    print_table(rows)
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    result = call(args, "config.set", key=args.key, value=args.value)
    if isinstance(result, dict) and result.get("restart"):
        state = "cleared" if result.get("value") is None else "set"
        print(f"{args.key} {state}; takes effect at the next start")
    return 0
