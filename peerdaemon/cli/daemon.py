"""The daemon itself: `run` starts it; `status` and `peers` ask a running one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peerdaemon.cli.common import (
    CliError,
    Commands,
    call,
    cell,
    connect,
    host_port,
    print_table,
    socket_path,
    to_json,
)
from peerdaemon.core.locations import default_data_dir


def register(commands: Commands) -> None:
    run = commands.command("run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--data-dir", metavar="DIR", help="where environments are stored")
    run.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="socket to listen on"
    )
    run.add_argument("--name", metavar="NAME", help="this device's name in spaces (kept)")
    run.add_argument(
        "--mirror-dir", metavar="DIR", help="mirror every environment into DIR, one file each"
    )
    run.add_argument(
        "--listen", metavar="HOST:PORT", type=host_port, help="accept LAN peers on this address"
    )
    run.add_argument(
        "--peer",
        metavar="HOST:PORT",
        type=host_port,
        action="append",
        default=[],
        help="a static peer to connect to (repeatable)",
    )
    run.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery")
    run.add_argument("--mdns-interface", metavar="NAME", help="run mDNS on this interface only")
    run.add_argument(
        "--max-frame", metavar="BYTES", type=int, help="largest socket frame accepted (64 MiB)"
    )
    run.add_argument(
        "--mock-faker-seed",
        metavar="N",
        type=int,
        help="seed faker.js in served mocks (as mockoon-cli --faker-seed): repeatable data",
    )

    p = commands.command("peers", cmd_peers, "show known devices and their link state")
    p.add_argument("--json", action="store_true", help="print the peers as JSON")

    p = commands.command("status", cmd_status, "show the daemon's status")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here: every other command is a client and should not pay for trio and the daemon.
    try:
        from peerdaemon.daemon.supervisor import run_daemon
    except ImportError as exc:
        raise CliError(f"the daemon is not available in this installation: {exc}") from None
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    options: dict[str, Any] = {"name": args.name} if getattr(args, "name", None) else {}
    if getattr(args, "mirror_dir", None):
        options["mirror_dir"] = Path(args.mirror_dir).expanduser().absolute()
    if args.listen:
        options["listen"] = args.listen
    if args.peer:
        options["peers"] = list(args.peer)
    if args.no_mdns:
        options["mdns"] = False
    if args.mdns_interface:
        options["mdns_interface"] = args.mdns_interface
    if args.max_frame:
        options["max_frame"] = args.max_frame
    if args.mock_faker_seed is not None:
        options["mock_faker_seed"] = args.mock_faker_seed
    return int(run_daemon(data_dir, socket_path(args), **options) or 0)


def cmd_peers(args: argparse.Namespace) -> int:
    result = call(args, "peers")
    if args.json:
        print(to_json(result))
        return 0
    rows = [("NAME", "DEVICE", "ADDRESS", "STATE", "REASON")]
    for peer in result.get("peers", []):
        reason = peer.get("reason") or ""
        versions = peer.get("versions")
        if reason == "incompatible-version" and isinstance(versions, dict):
            local, remote = versions.get("local", {}), versions.get("remote", {})
            reason += (
                f" (ours: proto {local.get('proto')} model {local.get('model')};"
                f" theirs: proto {remote.get('proto')} model {remote.get('model')})"
            )
        rows.append(
            (
                cell(peer.get("name")),
                cell(peer.get("device")),
                cell(peer.get("address")),
                cell(peer.get("state")),
                reason or "-",
            )
        )
    print_table(rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.status()
    if args.json:
        print(to_json(status))
        return 0
    if not (isinstance(status, dict) and "socket" in status):
        print(f"socket: {socket_path(args)}")
    if isinstance(status, dict):
        for key, value in status.items():
            shown = value if isinstance(value, str | int | float) else to_json(value, indent=None)
            print(f"{key}: {shown}")
    else:
        print(to_json(status))
    return 0
