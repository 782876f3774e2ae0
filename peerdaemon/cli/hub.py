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
    warn,
)
from peerdaemon.cli.daemon import add_log_options


def register(commands: Commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", metavar="DIR", help="the hub's data dir")
    common.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    only_config = argparse.ArgumentParser(add_help=False)
    only_config.add_argument("--config", metavar="FILE", help=CONFIG_HELP)

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
    p.add_argument(
        "--redis",
        metavar="URL",
        help="scaled mode: the cluster's Redis (redis://...; a Redis Cluster: redis+cluster://...)",
    )
    p.add_argument("--postgres", metavar="DSN", help="scaled mode: the cluster's PostgreSQL")
    add_log_options(p)
    p = command(
        hubs,
        "status",
        cmd_hub_status,
        "the hub's key fingerprint, if it runs and what it reports, users, spaces, storage",
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    group = hubs.add_group(
        "config",
        help="the hub's settings (its config file)",
        description="the hub's settings, kept in its config file: --config FILE, else"
        " $PEERDAEMON_HUB_CONFIG, else hub.toml in the user config dir (~/.config/peerdaemon)",
        dest="hub_config_command",
        metavar="CONFIG_COMMAND",
        example="peerdaemon hub config list --config /etc/peerdaemon/hub.toml",
    )
    p = group.command(
        "get",
        cmd_hub_config_get,
        "print a setting (exit 1 if it is not set)",
        example="peerdaemon hub config get limits.bytes_per_env",
        parents=[only_config],
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("--json", action="store_true", help="print the value as JSON")
    p = group.command(
        "set",
        cmd_hub_config_set,
        'change a setting in the config file, keeping its comments ("" removes it)',
        example="peerdaemon hub config set limits.devices_per_user 4",
        parents=[only_config],
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p = group.command(
        "list",
        cmd_hub_config_list,
        "every setting: its value, where it came from, whether a running hub applies it",
        example="peerdaemon hub config list --json",
        parents=[only_config],
    )
    p.add_argument("--json", action="store_true", help="print the settings as JSON")

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


CONFIG_HELP = (
    "the hub's TOML config file (default $PEERDAEMON_HUB_CONFIG, else hub.toml in the user"
    " config dir, if it exists)"
)


def _hub_config(args: argparse.Namespace, *, warnings: bool = True) -> Any:
    """The hub's settings as `hub serve` resolves them; the file's warnings (unknown keys) on
    stderr unless the caller logs them itself (`warnings=False`: `hub serve`)."""
    from peerdaemon.hub.config import config_path
    from peerdaemon.hub.server import ConfigError, build_config

    path, required = config_path(args.config)
    try:
        config = build_config(
            config_file=path,
            required=required,
            data_dir=Path(args.data_dir).expanduser() if args.data_dir else None,
            listen=getattr(args, "listen", None),
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
            redis=getattr(args, "redis", None),
            postgres=getattr(args, "postgres", None),
            log_level=getattr(args, "log_level", None),
            log_format=getattr(args, "log_format", None),
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if warnings:
        for warning in config.warnings:
            warn(f"warning: {warning}")
    return config


def _hub_admin(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    """Run `fn(accounts)` on the hub's accounts file (beside a running hub, or without one)."""
    import sqlite3

    from peerdaemon.hub.accounts import Accounts, AccountsError

    config = _hub_config(args)
    try:
        if config.postgres:  # a cluster's accounts (docs/hub-cluster.md)
            from peerdaemon.hub.cluster.accounts import ClusterAccounts
            from peerdaemon.hub.cluster.node import announce_accounts_change

            with ClusterAccounts.open_pg(config.postgres) as cluster_accounts:
                result = fn(cluster_accounts)
                changed = cluster_accounts.pushes > 0
            if changed and config.redis:
                announce_accounts_change(config.redis)
            return result
        with Accounts.open(config.data_dir) as accounts:
            return fn(accounts)
    except AccountsError as exc:
        raise CliError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise CliError(f"cannot open the hub's accounts: {exc}") from None


def cmd_hub_serve(args: argparse.Namespace) -> int:
    from peerdaemon.hub.server import run_hub

    log = {"log_level": args.log_level, "log_format": args.log_format}
    return int(run_hub(_hub_config(args, warnings=False), **log) or 0)


def cmd_hub_status(args: argparse.Namespace) -> int:
    import sqlite3

    from peerdaemon.hub.server import hub_status
    from peerdaemon.store import StoreError

    config = _hub_config(args)
    try:
        status = hub_status(
            config.data_dir,
            listen=config.listen,
            tls=bool(config.tls_cert),
            metrics_token=config.http.metrics_token,
            cluster=(str(config.redis), str(config.postgres)) if config.clustered else None,
        )
    except StoreError as exc:
        raise CliError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise CliError(f"cannot read the hub's data dir: {exc}") from None
    if args.json:
        print(to_json(status))
        return 0
    print(f"data dir: {status['data_dir']}")
    if config.config_file is not None and config.settings.file.exists:
        print(f"config file: {config.config_file}")
    print(f"hub key: {status['hub_key'] or '(none yet: start the hub once)'}")
    running = f"yes (pid {status['pid']})" if status["pid"] else "yes"
    print(f"running: {running if status['running'] else 'no'}")
    if status["running"]:
        _print_live(status)
    if "cluster" in status:
        _print_cluster(status["cluster"])
    spaces = status["spaces"]
    print(f"users: {status['users']}")
    print(f"spaces: {len(spaces)}")
    print(
        f"documents: {status['documents']}, {_size(status['stored_bytes'])} stored"
        f" (database {_size(status['db_bytes'])})"
    )
    if spaces:
        rows = [("SPACE", "OWNER", "MEMBERS", "DOCUMENTS", "STORED")]
        for sp in spaces:
            rows.append(
                (
                    cell(sp["id"]),
                    cell(sp["owner"] or "-"),
                    cell(sp["members"]),
                    str(sp["documents"]),
                    _size(sp["stored_bytes"]),
                )
            )
        print_table(rows)
    return 0


def _print_live(status: dict[str, Any]) -> None:
    """What a running hub answered (`/health`, `/metrics`), in a few lines."""
    if status.get("address"):
        print(f"address: {status['address']}")
    live = status.get("live")
    if live is None:
        print(f"live: {status.get('live_error') or 'not asked'}")
        return
    health = live["health"]
    print(f"version: {health.get('version', '?')}")
    figures = live.get("metrics")
    if figures is None:
        print(f"clients: {health.get('clients', '?')}, rooms: {health.get('rooms', '?')}")
        print(f"metrics: {live.get('metrics_error')}")
        return
    conns = figures.get("connections", {})
    print(
        f"connections: {conns.get('yjs', 0)} y-websocket, {conns.get('peer', 0)} daemons,"
        f" {conns.get('mock', 0)} mock; {figures.get('half_open_connections', 0)} half-open,"
        f" {figures.get('busy_refusals_total', 0)} refused busy"
    )
    relayed = figures.get("updates_relayed_total", 0)
    relayed_bytes = _size(figures.get("relayed_bytes_total", 0))
    print(f"rooms: {figures.get('rooms', 0)}; updates relayed: {relayed} ({relayed_bytes})")
    refusals = {k: v for k, v in figures.get("limit_refusals_total", {}).items() if v}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(refusals.items()))
    print(f"limit refusals: {sum(refusals.values())}{f' ({detail})' if detail else ''}")
    commits = figures.get("store_commit_seconds_count", 0)
    if commits:
        average = figures.get("store_commit_seconds_sum", 0) / commits * 1000
        print(f"store commits: {commits}, {average:.1f} ms on average")
    mocks = {k: v for k, v in figures.get("hosted_mocks", {}).items() if v}
    states = ", ".join(f"{v} {k}" for k, v in sorted(mocks.items()))
    print(
        f"cloud mocks: {sum(mocks.values())}{f' ({states})' if states else ''},"
        f" {figures.get('mock_requests_total', 0)} requests served"
    )
    if "cluster_info" in figures:  # a process of a cluster
        up = {0: "DOWN", 1: "up"}
        redis = up.get(figures.get("cluster_redis_up", 0), "?")
        postgres = up.get(figures.get("cluster_postgres_up", 0), "?")
        print(
            f"this process: {', '.join(figures['cluster_info'])}; redis {redis},"
            f" postgresql {postgres}; {figures.get('cluster_rooms_followed', 0)} rooms"
            f" followed, {figures.get('cluster_queued_commits', 0)} commits queued, bus lag"
            f" {float(figures.get('cluster_bus_lag_seconds', 0)) * 1000:.1f} ms"
        )


def _print_cluster(cluster: dict[str, Any]) -> None:
    """Scaled mode: PostgreSQL, Redis and every live process (from its heartbeat)."""
    for name in ("postgres", "redis"):
        server = cluster.get(name, {})
        state = "reachable" if server.get("reachable") else f"UNREACHABLE ({server.get('error')})"
        print(f"{'postgresql' if name == 'postgres' else name}: {state}")
    processes = cluster.get("processes", {})
    print(f"processes alive: {len(processes)}")
    if processes:
        rows = [("PROCESS", "HOST", "ADDRESS", "ROOMS", "CLIENTS", "QUEUED", "BUS LAG")]
        for name, p in sorted(processes.items()):
            queued = f"{p.get('queued_commits', 0)}"
            if p.get("queued_commits"):
                queued += f" ({p.get('oldest_commit_wait', 0):.1f} s)"
            rows.append(
                (
                    cell(name),
                    cell(f"{p.get('host', '?')}:{p.get('pid', '?')}"),
                    cell(p.get("address") or "-"),
                    str(p.get("rooms", 0)),
                    str(p.get("clients", 0)),
                    queued,
                    f"{float(p.get('bus_lag', 0)) * 1000:.1f} ms",
                )
            )
        print_table(rows)


def _size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


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


# --- hub config -------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> tuple[Any, Any, Path, bool]:
    """(schema, resolved settings, the file, whether it must exist): what `hub serve` would
    read, without its flags."""
    from peerdaemon.hub import config as hubconfig

    path, required = hubconfig.config_path(args.config)
    schema = hubconfig.schema()
    try:
        resolved = hubconfig.load(path, required=required, settings=schema)
    except hubconfig.ConfigFileError as exc:
        raise CliError(str(exc)) from None
    for warning in resolved.file.warnings:
        warn(f"warning: {warning}")
    return schema, resolved, path, required


def _setting(schema: Any, key: str) -> Any:
    from peerdaemon.hub.config import ConfigFileError

    try:
        return schema.setting(key)
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else to_json(value, indent=None)


def cmd_hub_config_get(args: argparse.Namespace) -> int:
    from peerdaemon.hub.config import shown

    schema, resolved, _, _ = _settings(args)
    setting = _setting(schema, args.key)
    value = resolved.values[setting.key]
    if value is None:
        raise CliError(f"{setting.key} is not set")
    value = shown(schema, setting.key, value)
    print(to_json(value) if args.json else _text(value))
    return 0


def cmd_hub_config_set(args: argparse.Namespace) -> int:
    from peerdaemon.core.configfile import set_value
    from peerdaemon.hub.config import HEADER, ConfigFileError, shown

    schema, resolved, path, required = _settings(args)
    setting = _setting(schema, args.key)
    try:
        value = set_value(schema, path, setting.key, args.value, header=HEADER)
    except ConfigFileError as exc:
        raise CliError(str(exc)) from None
    text = "(set)" if setting.key == "metrics.token" else _text(shown(schema, setting.key, value))
    what = (
        f"{setting.key} removed from {path}"
        if value is None
        else f"{setting.key} = {text} in {path}"
    )
    when = (
        "a running hub applies it within seconds (or at once on SIGHUP)"
        if setting.live
        else "it applies at the next start of the hub"
    )
    print(f"{what}: {when}")
    source = resolved.sources[setting.key]
    if source.startswith("env "):
        warn(f"warning: ${source[4:]} is set and wins over the file")
    return 0


def cmd_hub_config_list(args: argparse.Namespace) -> int:
    from peerdaemon.hub.config import shown

    schema, resolved, _, _ = _settings(args)
    if args.json:
        print(
            to_json(
                {
                    s.key: {
                        "value": shown(schema, s.key, resolved.values[s.key]),
                        "source": resolved.sources[s.key],
                        "live": s.live,
                        "env": schema.env_name(s),
                        "help": s.help,
                    }
                    for s in schema.settings
                }
            )
        )
        return 0
    rows = [("KEY", "VALUE", "SOURCE", "APPLIES")]
    for s in schema.settings:
        value = _text(shown(schema, s.key, resolved.values[s.key]))
        if s.key == "metrics.token" and resolved.values[s.key]:
            value = "(set)"  # a secret: `hub config get metrics.token` prints it
        rows.append((s.key, value, resolved.sources[s.key], "now" if s.live else "restart"))
    print_table(rows)
    return 0
