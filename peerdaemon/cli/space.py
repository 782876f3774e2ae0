"""`space`: groups of devices sharing environments, and `env share`/`env unshare`, which put an
environment into one (docs/spaces.md, docs/hublink.md)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from peerdaemon.api.client import Client
from peerdaemon.cli.common import (
    CliError,
    Commands,
    call,
    cell,
    connect,
    optional_call,
    print_table,
    resolve_env,
    to_json,
    warn,
)
from peerdaemon.cli.env import ID_HELP
from peerdaemon.cli.progress import Progress, format_bytes

JOIN_TIMEOUT = 120.0
"""How long `space join` waits for the first sync by default: long enough for a LAN or a hub
to deliver a large space, short enough that a script never hangs on an offline inviter."""
EXIT_NOT_SYNCED = 3
"""`space join` joined, but the first sync did not finish within `--timeout` (it goes on)."""
POLL = 0.25  # seconds between two looks at `space.list` while waiting


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
    p = envs.command(
        "resolve",
        cmd_env_resolve,
        "end an offline conflict of an `ask` space's environment (docs/spaces.md)",
        example="peerdaemon env resolve Demo --keep-local",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    choice = p.add_mutually_exclusive_group(required=True)
    for flag, what in (
        ("--keep-local", "every replica becomes this device's version"),
        ("--take-remote", "this device becomes the others' version"),
        ("--merge", "keep both sides' changes (the CRDT merge)"),
    ):
        choice.add_argument(flag, dest="choice", action="store_const", const=flag[2:], help=what)

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
        "join a space with an invite code, wait for its first sync; prints its id",
        example="peerdaemon space join pd1-... --timeout 300",
    )
    p.add_argument("code", metavar="CODE")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once joined; the first sync goes on in the background",
    )
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_timeout_seconds,
        default=JOIN_TIMEOUT,
        help=f"stop waiting for the first sync after this long (default {JOIN_TIMEOUT:g}; "
        f"0: no limit); the join is kept and the exit status is {EXIT_NOT_SYNCED}",
    )
    p = spaces.command(
        "list",
        cmd_space_list,
        "list spaces, members and shared environments",
        example="peerdaemon space list --json",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p = spaces.command(
        "policy",
        cmd_space_policy,
        "show or set what happens to offline changes: merge, or ask when both sides changed",
        example="peerdaemon space policy Team ask",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p.add_argument("policy", metavar="POLICY", nargs="?", choices=("merge", "ask"))
    p.add_argument("--json", action="store_true", help="print the setting as JSON")
    p = spaces.command(
        "leave",
        cmd_space_leave,
        "leave a space (its environments stay local)",
        example="peerdaemon space leave Team",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p = spaces.command(
        "remove-device",
        cmd_space_remove_device,
        "remove another device from a space: it is refused from now on and the secret rotates",
        example="peerdaemon space remove-device Team stolen-laptop",
    )
    p.add_argument("space", metavar="SPACE", help="space id or name")
    p.add_argument("device", metavar="DEVICE", help="device id, unique id prefix or member name")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
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
    with connect(args) as client:
        result = client.call("space.join", code=args.code)
        space_id = str(result["id"])
        code = 0 if args.no_wait else _wait_first_sync(client, space_id, args.timeout)
    print(space_id)
    return code


def _timeout_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds (0: no limit)")
    return value


def _find(spaces: Any, space_id: str) -> dict[str, Any] | None:
    for space in spaces if isinstance(spaces, list) else ():
        if isinstance(space, dict) and space.get("id") == space_id:
            return space
    return None


def _links(client: Client) -> tuple[set[str], int]:
    """Devices linked right now (LAN or through a hub), and the bytes received over those
    links: what moves while the first sync has nothing else to show."""
    rows = optional_call(client, "peers", {})
    rows = rows.get("peers") if isinstance(rows, dict) else None
    devices, received = set(), 0
    for row in rows if isinstance(rows, list) else ():
        if isinstance(row, dict) and row.get("state") == "connected":
            devices.add(str(row.get("device") or row.get("url") or "?"))
            count = row.get("bytes_received")
            if isinstance(count, int) and not isinstance(count, bool):
                received += count
    return devices, received


def _show(progress: Progress, space: dict[str, Any], links: set[str], received: int) -> None:
    members = {
        str(m.get("device"))
        for m in space.get("members") or ()
        if isinstance(m, dict) and not m.get("self")
    }
    data = f"{format_bytes(received)} received"
    total = space.get("environments_total") or 0
    if not members:  # the document is not here yet: this device is all the space lists
        progress.phase(
            "waiting for the space from its members",
            detail=f"{len(links)} peers connected, {data}",
        )
        return
    progress.phase(
        "receiving environments",
        done=space.get("environments_present") or 0,
        total=total,
        unit="environments",
        detail=f"{len(members & links)}/{len(members)} members connected, {data}",
    )


def _wait_first_sync(client: Client, space_id: str, timeout: float) -> int:
    """Wait until the daemon has the space's document and every environment it lists
    (`space.list`'s `synced`), polling a few times a second: a local call is cheap, and the
    daemon has no event for "the document arrived". 0 once synced; EXIT_NOT_SYNCED after
    `timeout` (0: none); 130 on Ctrl-C. The join is kept either way: say so."""
    deadline = time.monotonic() + timeout if timeout else None
    with Progress() as progress:
        _, start_bytes = _links(client) if progress.enabled else (set(), 0)
        progress.phase("waiting for the space from its members")
        try:
            while True:
                space = _find(client.call("space.list"), space_id)
                if space is None:
                    raise CliError(f"space {space_id} is gone (left meanwhile?)")
                if "synced" not in space:  # an older daemon: no way to tell
                    return 0
                if space["synced"]:
                    return 0
                if progress.enabled:  # piped: nobody to show it to
                    links, received = _links(client)
                    _show(progress, space, links, max(0, received - start_bytes))
                if deadline is not None and time.monotonic() >= deadline:
                    break
                pause = POLL if deadline is None else min(POLL, deadline - time.monotonic())
                ends = time.monotonic() + max(0.0, pause)
                while (left := ends - time.monotonic()) > 0:
                    progress.tick()
                    time.sleep(min(left, 0.1))
        except KeyboardInterrupt:
            progress.close()
            _kept(space_id, "interrupted")
            return 130
    _kept(space_id, f"not synced after {timeout:g} s")
    return EXIT_NOT_SYNCED


def _kept(space_id: str, why: str) -> None:
    warn(
        f"{why}: joined space {space_id}, and the first sync goes on in the background "
        "(see `peerdaemon space list`, `peerdaemon peers`)"
    )


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
    for space in spaces or ():
        for gone in space.get("removed") or ():
            print(f"{space.get('id')}: removed device {gone.get('device')}")
        if space.get("policy") == "ask":
            print(f"{space.get('id')}: offline policy ask (conflicting offline changes are held)")
        if space.get("state") == "incompatible-version":
            print(
                f"{space.get('id')}: incompatible-version: its environments need model "
                f"{space.get('needs')}; {space.get('action') or 'upgrade peerdaemon'} "
                "(this device keeps its copies and syncs none of them until then)"
            )
    return 0


def cmd_space_policy(args: argparse.Namespace) -> int:
    result = call(args, "space.policy", space=args.space, policy=args.policy)
    print(to_json(result) if args.json else result["policy"])
    return 0


def cmd_env_resolve(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.call("env.resolve", id=resolve_env(client, args.id), choice=args.choice)
    return 0


def cmd_space_leave(args: argparse.Namespace) -> int:
    call(args, "space.leave", space=args.space)
    return 0


def cmd_space_remove_device(args: argparse.Namespace) -> int:
    result = call(args, "space.remove_device", space=args.space, device=args.device)
    if args.json:
        print(to_json(result))
        return 0
    print(
        f"removed {result['device']} from space {result['space']}; its secret rotated "
        f"(key epoch {result['epoch']}): members get the new one when they meet a member "
        "that has it, and the removed device is refused on the LAN and by the space's hub.\n"
        "Through a hub, every account token that device used is refused for this space: "
        "the user's other devices that used the same token need a new one "
        "(`peerdaemon hub token add` on the hub, then `peerdaemon space hub SPACE URL --token`)."
    )
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
