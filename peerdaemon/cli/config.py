"""`config`: the daemon's settings (docs/spaces.md)."""

from __future__ import annotations

import argparse

from peerdaemon.cli.common import Commands, call, to_json


def register(commands: Commands) -> None:
    configs = commands.add_group(
        "config",
        help="daemon settings",
        description="daemon settings",
        dest="config_command",
        metavar="CONFIG_COMMAND",
    )
    p = configs.command("get", cmd_config_get, "print a setting (name)")
    p.add_argument("key", metavar="KEY")
    p = configs.command("set", cmd_config_set, "change a setting (name)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")


def cmd_config_get(args: argparse.Namespace) -> int:
    value = call(args, "config.get", key=args.key)
    print(value if isinstance(value, str) else to_json(value))
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    call(args, "config.set", key=args.key, value=args.value)
    return 0
