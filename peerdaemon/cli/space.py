"""`space`: groups of devices sharing environments, and `env share`/`env unshare`, which put an
environment into one (docs/spaces.md, docs/hublink.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from peerdaemon.cli.common import (
    CliError,
    Commands,
    call,
    cell,
    connect,
    print_table,
    resolve_env,
    to_json,
)
from peerdaemon.cli.env import ID_HELP


def register(commands: Commands) -> None:
    envs = commands.group("env")
    p = envs.command(
        "share",
        cmd_env_share,
        "share an environment in a space; prints its id",
        example="peerdaemon env share Demo --space Team",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("--space", metavar="SPACE", required=True, help="space id or name")
    p.add_argument(
        "--copy", action="store_true", help="share a duplicate with a new id, keep this one local"
    )
    p = envs.command(
        "unshare",
        cmd_env_unshare,
        "convert a shared environment back to local",
        example="peerdaemon env unshare Demo",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p = envs.command(
        "mock",
        cmd_env_mock,
        "show or change the hub's Cloud Mock of a shared environment",
        example="peerdaemon env mock Demo --hub on --access token",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument("--hub", choices=("on", "off"), help="serve it on the space's hub 24/7")
    p.add_argument(
        "--access", choices=("public", "token"), help="anyone with the URL, or the mock token too"
    )
    p.add_argument("--rotate-token", action="store_true", help="a new token; the old one stops")
    p.add_argument("--json", action="store_true", help="print the setting as JSON")

    spaces = commands.add_group(
        "space",
        help="groups of devices sharing environments",
        description="manage spaces",
        dest="space_command",
        metavar="SPACE_COMMAND",
        example="peerdaemon space list",
    )
    p = spaces.command(
        "create",
        cmd_space_create,
        "create a space; prints its id",
        example="peerdaemon space create Team",
    )
    p.add_argument("name", metavar="NAME", help="a name none of your spaces has yet")
    p = spaces.command(
        "invite",
        cmd_space_invite,
        "print an invite code for a space",
        example="peerdaemon space invite Team --address 192.168.1.20:7600",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        action="append",
        help="where this daemon can be reached (repeatable; default: what the daemon knows)",
    )
    p = spaces.command(
        "join",
        cmd_space_join,
        "join a space with an invite code; prints its id",
        example="peerdaemon space join pd1-...",
    )
    p.add_argument("code", metavar="CODE")
    p = spaces.command(
        "list",
        cmd_space_list,
        "list spaces, members and shared environments",
        example="peerdaemon space list --json",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p = spaces.command(
        "leave",
        cmd_space_leave,
        "leave a space (its environments stay local)",
        example="peerdaemon space leave Team",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p = spaces.command(
        "hub",
        cmd_space_hub,
        "sync a space through a hub too (docs/hublink.md)",
        example="peerdaemon space hub Team wss://hub.example.com --token -",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p.add_argument(
        "url", metavar="URL", nargs="?", help="ws(s)://HOST:PORT (default: the invite's hub)"
    )
    p.add_argument(
        "--token", metavar="TOKEN", required=True, help="your hub token (- reads it from stdin)"
    )
    trust = p.add_mutually_exclusive_group()
    trust.add_argument(
        "--hub-key",
        metavar="FINGERPRINT",
        help="the hub's key, as `peerdaemon hub status` prints it (default: the invite's)",
    )
    trust.add_argument(
        "--trust-first-use",
        action="store_true",
        help="trust the key the hub shows first, over a channel that does not authenticate it",
    )
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_wait_seconds,
        default=15.0,
        help="wait this long for the hub's answer (default 15; 0: only store the attachment)",
    )
    p = spaces.command(
        "unhub",
        cmd_space_unhub,
        "stop syncing a space through its hub",
        example="peerdaemon space unhub Team",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")


def cmd_env_mock(args: argparse.Namespace) -> int:
    change: dict[str, Any] = {}
    if args.hub is not None:
        change["hub"] = args.hub == "on"
    if args.access is not None:
        change["access"] = args.access
    if args.rotate_token:
        change["rotate_token"] = True
    with connect(args) as client:
        setting = client.call("env.mock", id=resolve_env(client, args.id), **change)
    if args.json:
        print(to_json(setting))
        return 0
    print(f"hub mock: {'on' if setting['hub'] else 'off'} ({setting['access']})")
    if setting["hub"]:
        url = setting["url"] or "(the space has no hub: peerdaemon space hub SPACE URL)"
        print(f"url: {url}")
    if setting.get("token"):
        print(f"token: {setting['token']}")
    return 0


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 to 60 seconds")
    return value


def cmd_env_share(args: argparse.Namespace) -> int:
    with connect(args) as client:
        env_id = resolve_env(client, args.id)
        result = client.call("env.share", id=env_id, space=args.space, copy=args.copy)
    print(result["id"])
    return 0


def cmd_env_unshare(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.call("env.unshare", id=resolve_env(client, args.id))
    return 0


def cmd_space_create(args: argparse.Namespace) -> int:
    print(call(args, "space.create", name=args.name)["id"])
    return 0


def cmd_space_invite(args: argparse.Namespace) -> int:
    call_args: dict[str, Any] = {"space": args.space}
    if args.address:
        call_args["addresses"] = args.address
    print(call(args, "space.invite", **call_args)["code"])
    return 0


def cmd_space_join(args: argparse.Namespace) -> int:
    result = call(args, "space.join", code=args.code)
    print(result["id"])
    return 0


def cmd_space_list(args: argparse.Namespace) -> int:
    spaces = call(args, "space.list")
    if args.json:
        print(to_json(spaces))
        return 0
    rows = [("ID", "NAME", "MEMBERS", "ENVIRONMENTS")]
    for space in spaces or ():
        members = [m.get("name") or m.get("device", "?")[:7] for m in space.get("members", ())]
        envs = [e.get("name") or e.get("id") for e in space.get("environments", ())]
        rows.append((cell(space.get("id")), cell(space.get("name")), cell(members), cell(envs)))
    print_table(rows)
    return 0


def cmd_space_leave(args: argparse.Namespace) -> int:
    call(args, "space.leave", space=args.space)
    return 0


def cmd_space_hub(args: argparse.Namespace) -> int:
    token = args.token
    if token == "-":  # keeps the token out of the shell history and `ps`
        token = sys.stdin.readline().strip()
    call_args: dict[str, Any] = {"space": args.space, "token": token, "wait": args.wait}
    if args.url:
        call_args["url"] = args.url
    if args.hub_key:
        call_args["hub_key"] = args.hub_key
    if args.trust_first_use:
        call_args["trust_first_use"] = True
    result = call(args, "space.hub", **call_args)
    outcome = result.get("outcome")
    url, key = result.get("url"), result.get("hub_key") or "not pinned"
    if outcome == "accepted":
        print(f"{args.space}: syncing through {url} (hub key {key})")
    elif outcome == "refused":
        raise CliError(
            f"the hub at {url} refused: {result.get('reason')}: {result.get('detail') or '-'} "
            "(the attachment is kept and retried; `peerdaemon space unhub` removes it)"
        )
    elif outcome == "no-answer":
        raise CliError(
            f"no answer from the hub at {url} within {args.wait:g} s "
            f"(last: {result.get('reason') or 'connecting'}); the attachment is kept and "
            "retried: see `peerdaemon peers`"
        )
    return 0


def cmd_space_unhub(args: argparse.Namespace) -> int:
    call(args, "space.unhub", space=args.space)
    return 0
