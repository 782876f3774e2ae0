"""The daemon itself: `run` starts it; `status` and `peers` ask a running one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peerdaemon.cli.common import (
    CliError,
    Commands,
    cell,
    config_file,
    connect,
    duration,
    host_port,
    megabytes,
    optional_call,
    print_table,
    socket_path,
    to_json,
    warn,
)
from peerdaemon.core.runner import FORMAT_ENV, LEVEL_ENV, LOG_FORMATS, LOG_LEVELS


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
    add_status_options(run)
    add_log_options(run)

    p = commands.command(
        "peers",
        cmd_peers,
        "show known devices and their link state (LAN, hubs, space members via a hub)",
        example="peerdaemon peers --json",
    )
    p.add_argument("--json", action="store_true", help="print the peers as JSON")

    p = commands.command(
        "status", cmd_status, "show the daemon's status", example="peerdaemon status --json"
    )
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")


def cmd_run(args: argparse.Namespace) -> int:
    """Settings: these flags, then PEERDAEMON_* variables, then the config file, then the
    defaults (daemon/config.py); the daemon keeps the file to pick up later edits."""
    import os

    # Imported here: every other command is a client and should not pay for trio and the daemon.
    try:
        from peerdaemon.daemon.config import ConfigFileError, daemon_config, load
        from peerdaemon.daemon.supervisor import run_daemon
    except ImportError as exc:
        raise CliError(f"the daemon is not available in this installation: {exc}") from None
    path, required = config_file(args)
    flags = run_flags(args)
    try:
        resolved = load(path, required=required, flags=flags)
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None
    for warning in resolved.file.warnings:
        warn(f"warning: {warning}")
    config = daemon_config(resolved, flags=flags, environ=dict(os.environ))
    return int(
        run_daemon(config, log_level=resolved["log.level"], log_format=resolved["log.format"]) or 0
    )


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """`run`'s flags as settings (daemon/config.py keys); None: not given."""
    absolute = lambda name: (  # noqa: E731
        Path(getattr(args, name)).expanduser().absolute() if getattr(args, name, None) else None
    )
    return {
        "name": getattr(args, "name", None),
        "data_dir": absolute("data_dir"),
        "socket": absolute("socket"),
        "mirror_dir": absolute("mirror_dir"),
        "lan.listen": args.listen,
        "lan.peers": list(args.peer) or None,
        "lan.mdns": False if args.no_mdns else None,
        "lan.mdns_interface": args.mdns_interface,
        "limits.max_frame": args.max_frame,
        "mock.faker_seed": args.mock_faker_seed,
        "status.enabled": False if args.no_status else None,
        "status.listen": args.status_listen,
        "status.tls_cert": absolute("status_tls_cert"),
        "status.tls_key": absolute("status_tls_key"),
        "status.hosts": list(args.status_host) or None,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }


def add_status_options(parser: argparse.ArgumentParser) -> None:
    """The status page's flags (docs/status-page.md)."""
    parser.add_argument(
        "--status-listen",
        metavar="HOST:PORT",
        type=host_port,
        help="serve the status page here (default 127.0.0.1:7611; off loopback only with TLS)",
    )
    parser.add_argument("--no-status", action="store_true", help="do not serve the status page")
    parser.add_argument("--status-tls-cert", metavar="FILE", help="the status page's certificate")
    parser.add_argument("--status-tls-key", metavar="FILE", help="the certificate's private key")
    parser.add_argument(
        "--status-host",
        metavar="NAME",
        action="append",
        default=[],
        help="a Host name the status page answers to besides localhost (repeatable)",
    )


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """`--log-level` and `--log-format` (`run`, `hub serve`); see `core.runner`."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        help=f"least severe messages logged (default info, or ${LEVEL_ENV})",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        type=str.lower,
        help=f"text lines, or one JSON object per line (default text, or ${FORMAT_ENV})",
    )


def _via_hub(result: Any, spaces: Any, status: Any) -> list[dict[str, Any]]:
    """Members of this device's spaces that are not linked to it directly, reached through a
    hub the space is attached to: one row per device and hub."""
    peers = result.get("peers", []) if isinstance(result, dict) else []
    direct = {
        p.get("device")
        for p in peers
        if isinstance(p, dict) and p.get("kind") != "hub" and p.get("state") == "connected"
    }
    hubs = status.get("hub") if isinstance(status, dict) else None
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for space in spaces if isinstance(spaces, list) else ():
        if not isinstance(space, dict):
            continue
        for hub in hubs if isinstance(hubs, list) else ():
            statuses = hub.get("spaces") if isinstance(hub, dict) else None
            if not isinstance(statuses, dict) or space.get("id") not in statuses:
                continue
            space_state = statuses[space.get("id")]
            for member in space.get("members") or ():
                device = member.get("device") if isinstance(member, dict) else None
                if not device or member.get("self") or device in direct:
                    continue
                row = rows.setdefault(
                    (device, hub.get("url")),
                    {
                        "kind": "via-hub",
                        "device": device,
                        "name": member.get("name") or None,
                        "hub": hub.get("url"),
                        "state": hub.get("state"),
                        "reason": hub.get("reason"),
                        "spaces": [],
                    },
                )
                row["spaces"].append(space.get("name") or space.get("id"))
                if space_state not in ("ok", "registered") and not row["reason"]:
                    row["reason"] = f"space {space_state}"
    return sorted(rows.values(), key=lambda r: (r["name"] or "", r["device"], r["hub"] or ""))


def cmd_peers(args: argparse.Namespace) -> int:
    with connect(args) as client:
        result = client.call("peers")
        spaces = optional_call(client, "space.list", [])
        status = optional_call(client, "status", {})
    via = _via_hub(result, spaces, status)
    if args.json:
        print(to_json({**result, "via_hub": via} if isinstance(result, dict) else result))
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
    for row in via:
        rows.append(
            (
                cell(row["name"]),
                cell(row["device"]),
                f"via hub {row['hub']}",
                cell(row["state"]),
                cell(row["reason"]),
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
        if not isinstance(status, dict):
            print(to_json(status))
            return 0
        spaces = optional_call(client, "space.list", []) if status.get("spaces") else []
        mocks = optional_call(client, "mock.list", [])
    print_status(status, spaces, mocks, str(socket_path(args)))
    return 0


def print_status(status: dict[str, Any], spaces: Any, mocks: Any, socket: str) -> None:
    """`status` for a person: the daemon, its store, then a section per space, hub and mock.
    Keys this does not know (a newer daemon's) are shown as they are, at the end."""
    rest = dict(status)
    lines: list[tuple[str, str]] = []

    def take(key: str) -> Any:
        return rest.pop(key, None)

    version, pid, uptime = take("version"), take("pid"), take("uptime")
    lines.append(("version", cell(version)))
    lines.append(("pid", cell(pid)))
    lines.append(("uptime", duration(uptime)))
    device, name = take("device"), take("name")
    if device or name:
        lines.append(("device", f"{name or '-'} ({device})" if device else cell(name)))
    lines.append(("socket", cell(take("socket") or socket)))
    lines.append(("data dir", cell(take("data_dir"))))
    count, newer = take("environments"), take("newer") or []
    envs = cell(count)
    if newer:
        envs += f" ({len(newer)} from a newer Mockoon: {', '.join(map(str, newer))})"
    lines.append(("environments", envs))
    store = take("store")
    if isinstance(store, dict):
        size = store.get("db_bytes")
        if size is None:
            size = (store.get("snapshot_bytes") or 0) + (store.get("log_bytes") or 0)
        text = f"{megabytes(size)} on disk"
        if store.get("queued"):
            text += f", {store['queued']} writes queued"
        if store.get("error"):
            text += f"; ERROR: {store['error']}"
        lines.append(("store", text))
    elif store is not None:
        lines.append(("store", cell(store)))
    last, model = take("last_migration"), take("model_version")
    if last is not None or model is not None:
        lines.append(("model", f"Mockoon lastMigration {cell(last)}, model version {cell(model)}"))
    events = take("events")
    if events is not None:
        lines.append(("last event", cell(events)))
    config = take("config")
    if isinstance(config, dict):
        text = config.get("file") or "none"
        if config.get("pending"):
            text += f"; restart to apply: {', '.join(map(str, config['pending']))}"
        if config.get("error"):
            text += f"; NOT RELOADED: {config['error']}"
        lines.append(("config", text))
    space_count = take("spaces")
    incompatible = take("incompatible") or []
    conflicts = take("conflicts") or []
    hubs = take("hub")
    width = max(len(label) for label, _ in lines) + 1
    for label, value in lines:
        print(f"{label + ':':<{width}} {value}")

    names = {s.get("id"): s.get("name") for s in spaces if isinstance(s, dict)}
    if space_count:
        print(f"\nspaces ({space_count}):")
        for space in spaces if isinstance(spaces, list) else ():
            members = [m for m in space.get("members") or () if not m.get("self")]
            shared = space.get("environments") or ()
            print(
                f"  {space.get('name') or '-'} ({space.get('id')}): "
                f"{len(members)} other member{'s' if len(members) != 1 else ''}, "
                f"{len(shared)} environment{'s' if len(shared) != 1 else ''}"
            )
    for item in incompatible if isinstance(incompatible, list) else ():
        if isinstance(item, dict):
            envs = item.get("environments") or ()
            which = f" ({len(envs)} environment{'s' if len(envs) != 1 else ''})" if envs else ""
            print(
                f"  incompatible-version: {item.get('name') or item.get('space')}{which} needs "
                f"model {item.get('needs')}, this device runs {item.get('model')}: "
                f"{item.get('action') or 'upgrade peerdaemon'}; not synced until then"
            )
    for item in conflicts if isinstance(conflicts, list) else ():
        if isinstance(item, dict):
            print(
                f"  conflict: environment {item.get('id')} changed here and elsewhere while "
                f"apart; held until `peerdaemon env resolve {item.get('id')} --keep-local | "
                "--take-remote | --merge`"
            )
    if hubs:
        print(f"\nhubs ({len(hubs)}):")
        for hub in hubs:
            print(f"  {_hub_line(hub, names)}")
            for error in hub.get("errors") or ():
                detail = f": {error['detail']}" if error.get("detail") else ""
                print(f"    error: {error.get('doc')}: {error.get('reason')}{detail}")
    if isinstance(mocks, list) and mocks:
        print(f"\nmocks ({len(mocks)}):")
        for mock in mocks:
            line = f"  {mock.get('name') or mock.get('id')}: {mock.get('state')}"
            if mock.get("url"):
                line += f" at {mock['url']}"
            if mock.get("requests") is not None:
                line += f", {mock['requests']} requests"
            error = mock.get("error")
            if isinstance(error, dict):
                line += f"; error {error.get('code')}: {error.get('message')}"
            print(line)
    for key, value in rest.items():  # sections of other services (status page...) and newer keys
        if isinstance(value, dict):
            print(f"\n{key.replace('_', ' ')}:")
            for sub, item in value.items():
                print(f"  {sub.replace('_', ' ')}: {_shown(item)}")
        else:
            print(f"{key.replace('_', ' ')}: {_shown(value)}")


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value) if isinstance(value, str | int | float) else to_json(value, indent=None)


def _hub_line(hub: dict[str, Any], names: dict[Any, Any]) -> str:
    line = f"{hub.get('url')}: {hub.get('state')}"
    if hub.get("state") == "connected":
        if hub.get("user"):
            line += f" as {hub['user']}"
        line += ", synced" if hub.get("synced") else ", syncing"
    else:
        reason = hub.get("reason") or ""
        detail = hub.get("detail") or ""
        if reason or detail:
            line += f" ({reason}{': ' if reason and detail else ''}{detail})"
    key = hub.get("hub_key")
    line += f"; key {key}" if key else "; key NOT PINNED"
    statuses = hub.get("spaces")
    if isinstance(statuses, dict) and statuses:
        line += "; spaces: " + ", ".join(
            f"{names.get(space) or space} {state}" for space, state in statuses.items()
        )
    return line
