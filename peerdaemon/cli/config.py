"""`config`: the daemon's settings, kept in one TOML file (docs/config.md, daemon/config.py).

`get` and `list` show what a running daemon uses (and what waits for its next start); with no
daemon, what it would start with. `set` edits the file, keeping its comments, and has the
running daemon pick the change up: live settings apply at once, the others at the next start,
and the command says which.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from peerdaemon.api.client import Client, ClientError, DaemonError
from peerdaemon.cli.common import (
    PROG,
    CliError,
    Commands,
    config_file,
    print_table,
    socket_path,
    to_json,
)


def register(commands: Commands) -> None:
    configs = commands.add_group(
        "config",
        help="the daemon's settings (one TOML file)",
        description="the daemon's settings, kept in one TOML file (--config, $PEERDAEMON_CONFIG, "
        "else ~/.config/peerdaemon/config.toml); flags win over PEERDAEMON_* variables, "
        "which win over the file. `config list` shows every key and where its value came from.",
        dest="config_command",
        metavar="CONFIG_COMMAND",
        example="peerdaemon config list",
    )
    p = configs.command(
        "get",
        cmd_config_get,
        "print a setting (exit 1 if it is not set)",
        example="peerdaemon config get lan.listen",
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print the value as JSON (null: not set)")
    p = configs.command(
        "set",
        cmd_config_set,
        'change a setting in the config file ("" removes it); says when it applies',
        example="peerdaemon config set lan.peers 192.168.1.20:7600,192.168.1.21:7600",
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p = configs.command(
        "list",
        cmd_config_list,
        "list every setting, its value and where that came from",
        example="peerdaemon config list --json",
    )
    p.add_argument("--json", action="store_true", help="print the settings as JSON")
    configs.command(
        "path",
        cmd_config_path,
        "print the config file's path (it may not exist yet)",
        example="peerdaemon config path",
    )


# --------------------------------------------------------------------------------- the views
def _running(args: argparse.Namespace) -> dict[str, Any] | None:
    """The running daemon's `config.get`, or None when no daemon answers."""
    try:
        with Client.connect(socket_path(args), timeout=5.0) as client:
            answer = client.call("config.get")
    except DaemonError:
        return None  # an older daemon
    except ClientError:
        return None
    return answer if isinstance(answer, dict) and isinstance(answer.get("settings"), dict) else None


def _local(args: argparse.Namespace) -> dict[str, Any]:
    """What a daemon started now, with this environment and no flags, would use."""
    from peerdaemon.daemon.config import SCHEMA, ConfigFileError, load, shown

    path, required = config_file(args)
    try:
        resolved = load(path, required=required)
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None
    settings = {}
    for setting in SCHEMA.settings:
        key = setting.key
        settings[key] = {
            "value": shown(key, resolved.values[key]),
            "source": resolved.sources[key],
            "live": setting.live,
            "env": SCHEMA.env_name(setting),
            "help": setting.help,
        }
    return {
        "file": str(path),
        "exists": path.exists(),
        "running": False,
        "warnings": resolved.file.warnings,
        "settings": settings,
    }


def _view(args: argparse.Namespace) -> dict[str, Any]:
    running = _running(args)
    if running is None:
        return _local(args)
    path = running.get("file")
    return {
        "file": path,
        "exists": bool(path) and Path(path).exists(),
        "running": True,
        "error": running.get("error"),
        "settings": running["settings"],
    }


def _key(key: str) -> str:
    from peerdaemon.daemon.config import SCHEMA, ConfigFileError

    try:
        return SCHEMA.setting(key).key
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


# ---------------------------------------------------------------------------------- commands
def cmd_config_get(args: argparse.Namespace) -> int:
    key = _key(args.key)
    row = _view(args)["settings"][key]
    if args.json:
        print(to_json(row.get("value")))
        return 0
    if row.get("value") is None:
        raise CliError(f"{key} is not set")
    print(_text(row["value"]))
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    view = _view(args)
    if args.json:
        print(to_json(view))
        return 0
    where = view.get("file") or "none (the daemon was started without one)"
    state = "" if view.get("exists") else " (not created yet)"
    print(f"config file: {where}{state}")
    if not view.get("running"):
        print("daemon: not running (values it would start with)")
    if view.get("error"):
        print(f"last reload failed: {view['error']}")
    rows = [("KEY", "VALUE", "SOURCE", "APPLIES")]
    for key, row in view["settings"].items():
        value = "-" if row.get("value") is None else _text(row["value"])
        applies = "now" if row.get("live") else "at start"
        if "pending" in row:
            applies = f"restart to use {_text(row['pending'])}"
        rows.append((key, value, row.get("source", ""), applies))
    print_table(rows)
    return 0


def cmd_config_path(args: argparse.Namespace) -> int:
    print(config_file(args)[0])
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    from peerdaemon.core.configfile import set_value
    from peerdaemon.daemon.config import HEADER, SCHEMA, ConfigFileError

    key = _key(args.key)
    live = SCHEMA.by_key[key].live
    path, _required = config_file(args)
    explicit = bool(getattr(args, "config", None) or os.environ.get("PEERDAEMON_CONFIG"))
    running = _running(args)
    daemon_file = running.get("file") if running else None
    if running is not None and daemon_file and (not explicit or Path(daemon_file) == path):
        # the daemon edits the file it reads and applies what it can
        try:
            with Client.connect(socket_path(args), timeout=30.0) as client:
                result = client.call("config.set", key=key, value=args.value)
        except DaemonError as exc:
            raise CliError(exc.message) from None
        if result.get("applies") == "refused":
            raise CliError(
                f"{key} set in {daemon_file}, but the daemon did not take it: {result.get('reason')}"
            )
        _said(key, args.value, daemon_file, result.get("applies"))
        return 0
    if running is not None and not daemon_file and not explicit:
        # a daemon started without a file (embedded in a program): it takes live settings
        # directly, and no file is written that it would never read
        if not live:
            raise CliError(
                f"{key}: the running daemon reads no config file (set it where it starts)"
            )
        with Client.connect(socket_path(args), timeout=30.0) as client:
            client.call("config.set", key=key, value=args.value)
        print(f"{key} applied now (the running daemon reads no config file)")
        return 0
    try:
        set_value(SCHEMA, path, key, args.value, header=HEADER)
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None
    _said(key, args.value, str(path), None)
    if daemon_file:
        print(f"note: the running daemon reads {daemon_file}, not this file")
    return 0


def _said(key: str, value: str, path: str, applies: str | None) -> None:
    what = "removed from" if value == "" else "set in"
    if applies == "now":
        print(f"{key} {what} {path}; applied now")
    elif applies == "at start":
        print(
            f"{key} {what} {path}; applies at the next start (restart: `{PROG} service "
            "status` says how it runs)"
        )
    else:
        print(f"{key} {what} {path}; the daemon reads it when it starts")
