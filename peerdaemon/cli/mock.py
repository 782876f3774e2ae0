"""`mock`: serve environments with Mockoon's own engine (docs/mock-runner.md), live on the merged
state. `mock install` works without a daemon: it puts the pinned runner into the data dir."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

from peerdaemon.cli.common import (
    CliError,
    Commands,
    call,
    cell,
    connect,
    data_dir_of,
    print_table,
    resolve_env,
    to_json,
)


def register(commands: Commands) -> None:
    mocks = commands.add_group(
        "mock",
        help="serve environments as live mock APIs (Mockoon's engine; needs Node.js 18+)",
        description="serve environments as live mock APIs with Mockoon's own engine",
        dest="mock_command",
        metavar="MOCK_COMMAND",
    )
    p = mocks.command("install", cmd_install, "install the pinned mock runner (npm ci)")
    p.add_argument("--data-dir", metavar="DIR", help="the daemon's data dir (default: as `run`)")
    p = mocks.command("start", cmd_start, "serve an environment; kept across restarts")
    p.add_argument("id", metavar="ID")
    p.add_argument("--port", metavar="P", type=int, help="port (default: the environment's)")
    p.add_argument("--hostname", metavar="H", help="address to listen on (default: the env's)")
    p = mocks.command("stop", cmd_stop, "stop serving an environment")
    p.add_argument("id", metavar="ID")
    p = mocks.command("list", cmd_list, "served environments: state, URL, requests, last error")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p = mocks.command("logs", cmd_logs, "requests served: one line each")
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new requests")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", metavar="N", type=int, default=100, help="past requests (100)")


def cmd_install(args: argparse.Namespace) -> int:
    from peerdaemon.mock import InstallError, install

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else data_dir_of(args)
    try:
        where = install(data_dir)
    except InstallError as exc:
        raise CliError(str(exc)) from None
    print(f"mock runner installed in {where}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    with connect(args) as client:
        env_id = resolve_env(client, args.id)
        server = client.call("mock.start", id=env_id, port=args.port, hostname=args.hostname)
    print(server["url"] if server["state"] == "running" else f"{server['state']}: {server['url']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with connect(args) as client:  # a mock may outlive its environment: then ID as it is
        client.call("mock.stop", id=resolve_env(client, args.id, missing_ok=True))
    return 0


def _error(server: dict[str, Any]) -> str:
    error = server.get("error")
    if not error:
        return "-"
    return f"{error.get('code')}: {error.get('message')}"


def cmd_list(args: argparse.Namespace) -> int:
    servers = call(args, "mock.list")
    if args.json:
        print(to_json(servers))
        return 0
    if not servers:
        print("no environments are served (peerdaemon mock start ID)")
        return 0
    rows = [("ID", "NAME", "WHERE", "STATE", "URL", "REQUESTS", "LAST ERROR")]
    for server in servers:
        rows.append(
            (
                server["id"],
                cell(server["name"]),
                server.get("where", "device"),
                server["state"],
                cell(server["url"]),
                cell(server.get("requests")),
                _error(server),
            )
        )
    print_table(rows)
    return 0


def format_entry(entry: dict[str, Any]) -> str:
    """time method path status route response duration: one request per line."""
    when = entry.get("time")
    stamp = (
        datetime.datetime.fromtimestamp(when / 1000).isoformat(timespec="milliseconds")
        if isinstance(when, int | float)
        else "-"
    )
    path = str(entry.get("path") or "")
    if entry.get("query"):
        path += f"?{entry['query']}"
    duration = entry.get("durationMs")
    return "  ".join(
        [
            stamp,
            str(entry.get("method") or "-"),
            path or "-",
            str(entry.get("status") or "-"),
            cell(entry.get("routeUUID")),
            cell(entry.get("routeResponseUUID")),
            f"{duration}ms" if duration is not None else "-",
        ]
    )


def _print(entry: dict[str, Any], as_json: bool) -> None:
    print(to_json(entry, indent=None) if as_json else format_entry(entry), flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        env_id = resolve_env(client, args.id, missing_ok=True)
        if not args.follow:
            for entry in client.call("mock.logs", id=env_id, limit=args.limit)["entries"]:
                _print(entry, args.json)
            return 0
    with (
        connect(args) as client,
        client.subscribe("mock.logs", id=env_id, limit=args.limit, follow=True) as subscription,
    ):
        for entry in subscription.initial["entries"]:
            _print(entry, args.json)
        for event in subscription:
            if event.get("type") == "request":
                _print({k: v for k, v in event.items() if k != "type"}, args.json)
    return 0
