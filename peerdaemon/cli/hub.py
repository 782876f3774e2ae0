"""`hub`: running and administering the self-hosted hub (docs/hub.md). These commands work on
the hub's data dir directly, not through a daemon; the hub's modules are imported only when one
of them runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peerdaemon.cli.common import (
    CliError,
    Commands,
    Handler,
    cell,
    host_port,
    print_table,
    to_json,
)


def register(commands: Commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="DIR", help="the hub's data dir")
    common.add_argument("--config", metavar="FILE", help="the hub's TOML config file")

    def command(group: Commands, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        return group.command(name, handler, help, parents=[common])

    hubs = commands.add_group(
        "hub",
        help="the self-hosted hub",
        description="the hub (server)",
        dest="hub_command",
        metavar="HUB_COMMAND",
    )
    p = command(hubs, "serve", cmd_hub_serve, "run the hub in the foreground")
    p.add_argument("--listen", metavar="HOST:PORT", type=host_port, help="default 127.0.0.1:8765")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="... and this private key (PEM)")
    p = command(hubs, "status", cmd_hub_status, "print the hub's key fingerprint and if it runs")
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    group = hubs.add_group(
        "user", help="hub users", dest="hub_user_command", metavar="USER_COMMAND"
    )
    p = command(
        group, "add", cmd_hub_user_add, "add a user (and its personal space); prints a token"
    )
    p.add_argument("name", metavar="NAME")
    p = command(group, "list", cmd_hub_user_list, "list users")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    group = hubs.add_group(
        "token", help="access tokens", dest="hub_token_command", metavar="TOKEN_COMMAND"
    )
    p = command(group, "add", cmd_hub_token_add, "another token for a user; prints it")
    p.add_argument("user", metavar="USER")
    p = command(group, "revoke", cmd_hub_token_revoke, "revoke a token (whole, or a unique prefix)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("token", metavar="TOKEN", nargs="?", help="- reads it from stdin")
    which.add_argument(
        "--token",
        dest="token_option",
        metavar="TOKEN",
        help="the same, for any value: --token=VALUE (a token of the older form may start with -)",
    )
    p = command(group, "list", cmd_hub_token_list, "list tokens (their first characters)")
    p.add_argument("user", metavar="USER", nargs="?")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    group = hubs.add_group(
        "space", help="spaces on the hub", dest="hub_space_command", metavar="SPACE_COMMAND"
    )
    p = command(group, "create", cmd_hub_space_create, "create a team space")
    p.add_argument("space", metavar="SPACE_ID")
    p.add_argument("--owner", metavar="USER", required=True)
    p.add_argument("--name", metavar="NAME")
    p = command(group, "add-member", cmd_hub_space_add_member, "let a user reach a space")
    p.add_argument("space", metavar="SPACE_ID")
    p.add_argument("user", metavar="USER")
    p = command(group, "remove-member", cmd_hub_space_remove_member, "remove a user from a space")
    p.add_argument("space", metavar="SPACE_ID")
    p.add_argument("user", metavar="USER")
    p = command(group, "list", cmd_hub_space_list, "list spaces, owners and members")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    group = hubs.add_group(
        "limits", help="limits", dest="hub_limits_command", metavar="LIMITS_COMMAND"
    )
    p = command(group, "set", cmd_hub_limits_set, "set a limit for the hub or one user")
    p.add_argument("--user", metavar="USER", help="only for this user")
    p.add_argument(
        "key",
        metavar="KEY",
        choices=(
            "envs_per_space",
            "bytes_per_env",
            "devices_per_user",
            "hosted_mocks",
            "mock_rps",
            "mock_body_bytes",
        ),
    )
    p.add_argument("value", metavar="VALUE", help="an integer (sizes: also 15MB, 64MiB)")


def _hub_config(args: argparse.Namespace) -> Any:
    from peerdaemon.hub.server import ConfigError, build_config

    try:
        return build_config(
            config_file=Path(args.config).expanduser() if args.config else None,
            data_dir=Path(args.data_dir).expanduser() if args.data_dir else None,
            listen=getattr(args, "listen", None),
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _hub_admin(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    """Run `fn(accounts)` on the hub's accounts file (beside a running hub, or without one)."""
    import sqlite3

    from peerdaemon.hub.accounts import Accounts, AccountsError

    try:
        with Accounts.open(_hub_config(args).data_dir) as accounts:
            return fn(accounts)
    except AccountsError as exc:
        raise CliError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise CliError(f"cannot open the hub's accounts: {exc}") from None


def cmd_hub_serve(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import run_hub

    return int(run_hub(_hub_config(args)) or 0)


def cmd_hub_status(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import hub_status
    from peerdaemon.store import StoreError

    try:
        status = hub_status(_hub_config(args).data_dir)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(to_json(status))
        return 0
    print(f"data dir: {status['data_dir']}")
    print(f"hub key: {status['hub_key'] or '(none yet: start the hub once)'}")
    running = f"yes (pid {status['pid']})" if status["pid"] else "yes"
    print(f"running: {running if status['running'] else 'no'}")
    return 0


def cmd_hub_user_add(args: argparse.Namespace) -> int:
    print(_hub_admin(args, lambda a: a.add_user(args.name)))
    return 0


def cmd_hub_user_list(args: argparse.Namespace) -> int:
    users = _hub_admin(args, lambda a: a.users())
    if args.json:
        print(to_json(users))
    else:
        for user in users:
            print(f"{user['name']}  personal space {user['personal_space']}")
    return 0


def cmd_hub_token_add(args: argparse.Namespace) -> int:
    print(_hub_admin(args, lambda a: a.add_token(args.user)))
    return 0


def cmd_hub_token_revoke(args: argparse.Namespace) -> int:
    token = args.token if args.token_option is None else args.token_option
    if token == "-":  # keeps the token out of the shell history and `ps`
        token = sys.stdin.readline().strip()
    _hub_admin(args, lambda a: a.revoke_token(token))
    return 0


def cmd_hub_token_list(args: argparse.Namespace) -> int:
    tokens = _hub_admin(args, lambda a: a.tokens(args.user))
    if args.json:
        print(to_json(tokens))
    else:
        for t in tokens:
            print(f"{t['prefix']}...  {t['user']}{'  revoked' if t['revoked'] else ''}")
    return 0


def cmd_hub_space_create(args: argparse.Namespace) -> int:
    _hub_admin(args, lambda a: a.create_space(args.space, args.owner, args.name or ""))
    return 0


def cmd_hub_space_add_member(args: argparse.Namespace) -> int:
    _hub_admin(args, lambda a: a.add_member(args.space, args.user))
    return 0


def cmd_hub_space_remove_member(args: argparse.Namespace) -> int:
    _hub_admin(args, lambda a: a.remove_member(args.space, args.user))
    return 0


def cmd_hub_space_list(args: argparse.Namespace) -> int:
    spaces = _hub_admin(args, lambda a: a.spaces())
    if args.json:
        print(to_json(spaces))
        return 0
    rows = [("ID", "NAME", "OWNER", "MEMBERS")]
    for sp in spaces:
        rows.append((cell(sp["id"]), cell(sp["name"]), cell(sp["owner"]), cell(sp["members"])))
    print_table(rows)
    return 0


def cmd_hub_limits_set(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import parse_size

    try:
        value = parse_size(args.value)
    except ValueError as exc:
        raise CliError(f"{args.key}: {exc}") from None
    _hub_admin(args, lambda a: a.set_limit(args.key, value, args.user))
    return 0
